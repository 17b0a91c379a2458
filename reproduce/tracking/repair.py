"""Completing tracked runs from the run's own files (history.tsv, metrics.json), which are the truth.

Three moments do it: a resumed training run (the Tracker is given the epochs so far and each backend
sends those it lacks), the rerun of a finished run that says "already done" (``repair_finished_run``),
and `python -m reproduce.tracking sync` (``sync``) for whatever the ledger still lists: runs that an
outage or a full disk kept from a backend, and runs a killed process left RUNNING, which end KILLED."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from reproduce.tracking import ledger
from reproduce.tracking.tracker import Tracker


def repair_finished_run(key: str | None, history: list[dict[str, float]], summary: dict[str, Any], *,
                        enabled: bool = True) -> bool:
    """A finished run met again: if the ledger lists it (its last process was killed or a backend was
    down), re-send what each listed backend lacks and finish it. Free when nothing is listed. Returns
    whether anything was listed."""
    entry = ledger.read(key) if enabled and key else None
    if entry is None or _in_use(entry):
        return False
    Tracker.reopen(entry, history).finish(summary)
    return True


def sync(dry_run: bool = False) -> list[str]:
    """Complete every run the ledger lists and no live process holds; one line per run, saying what
    was done or what is still missing."""
    lines = []
    for entry in ledger.entries():
        run = ledger.run_info(entry)
        pending = ", ".join(entry["pending"])
        if _in_use(entry):
            lines.append(f"{run.name} ({run.key}): in use by process {entry['owner']['pid']}, left alone")
            continue
        history_file, metrics_file = run.run_dir / "history.tsv", run.run_dir / "metrics.json"
        history = ledger.read_history(history_file) if history_file.is_file() else []
        summary = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
        outcome = "finished" if summary is not None else "ended KILLED (not finished)"
        if not dry_run:
            tracker = Tracker.reopen(entry, history)
            tracker.finish(summary) if summary is not None else tracker.suspend()
        still = ledger.read(run.key)
        if still and not dry_run:
            reasons = "; ".join(f"{label}: {reason}" for label, reason in still.get("reasons", {}).items())
            lines.append(f"{run.name} ({run.key}): still pending for {', '.join(still['pending'])} ({reasons})")
        else:
            verb = "would send" if dry_run else "sent"
            lines.append(f"{run.name} ({run.key}): {verb} {len(history)} epochs from {_shown(run.run_dir)} to "
                         f"{pending}, {outcome}")
    return lines


def _in_use(entry: dict[str, Any]) -> bool:
    return ledger.owner_alive(entry) and entry.get("owner", {}).get("pid") != os.getpid()


def _shown(path: Path) -> str:
    return str(path) if path.exists() else f"{path} (gone: nothing to re-send)"
