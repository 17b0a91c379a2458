"""``python -m reproduce.launch ORDER.json``: one fanned-out run in a process of its own (the local pool
starts it; not a command for people). Its output goes to the run's log; the exit code tells the pool how
it ended: 0 trained (or already done), 130 interrupted (it resumes on the next call), 1 failed."""

from __future__ import annotations

import sys
from pathlib import Path

from reproduce.launch.runs import INTERRUPTED, RunOrder, train_run


def main(argv: list[str]) -> int:
    order = RunOrder.from_json(Path(argv[0]).read_text())
    try:
        train_run(order)
    except KeyboardInterrupt:
        print(f"[{order.run.name}] interrupted; the next call resumes it from its last checkpoint", flush=True)
        return INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
