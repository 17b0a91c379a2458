"""`python -m reproduce.tracking sync`: send the tracking services what they missed.

Runs that a tracking outage, a full disk or a killed process left incomplete are listed in the
pending-runs ledger (.tracking/pending/, or $REPRODUCE_TRACKING_DIR/pending); this re-sends each
one's epochs and summary from its run folder to the backends it lists, and ends runs that never
finished as KILLED. Exit code 1 while a run is still pending (a service still down)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduce.tracking", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sync_parser = commands.add_parser("sync", help="re-send the runs the ledger lists to the backends that missed them")
    sync_parser.add_argument("--dry-run", action="store_true", help="list what would be sent, send nothing")
    args = parser.parse_args(argv)

    from reproduce.tracking import ledger
    from reproduce.tracking.repair import sync

    lines = sync(dry_run=args.dry_run)
    print("\n".join(lines) if lines else f"nothing pending in {ledger.ledger_dir()}")
    return 1 if not args.dry_run and any("still pending" in line for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
