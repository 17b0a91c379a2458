"""``python -m reproduce COMMAND``: the commands are the modules of reproduce/cli/ (``--help`` lists them)."""

from __future__ import annotations

import sys

from reproduce.cli import main

if __name__ == "__main__":
    sys.exit(main())
