"""The pending-runs ledger: which runs a tracking backend may lack something of.

A run is entered (one small JSON file per run key, written atomically) before any backend is
contacted, and a backend is crossed off once it has finished the run. So a run that a killed
process, an outage or a full disk left incomplete stays listed, with what is needed to reopen it;
a rerun of the run (or `python -m reproduce.tracking sync`) re-sends what each listed backend lacks
and crosses it off. The local files (history.tsv, metrics.json) are the source of truth; the entry
only says where to look. Lives in $REPRODUCE_TRACKING_DIR, by default ``.tracking/`` in the project."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Any

from reproduce.io import atomic_write_text  # noqa: F401  (re-exported for tests that edit an entry)
from reproduce.tracking.backend import RunInfo


def ledger_dir() -> Path:
    return Path(os.environ.get("REPRODUCE_TRACKING_DIR", Path.cwd() / ".tracking")) / "pending"


def _path(key: str) -> Path:
    return ledger_dir() / f"{key}.json"


def enter(run: RunInfo, tracking: dict[str, Any], labels: list[str]) -> None:
    """List ``labels`` (backend labels) as pending for ``run``, added to any already pending."""
    entry = read(run.key) or {}
    pending = sorted(set(entry.get("pending", [])) | set(labels))
    info = {**asdict(run), "run_dir": str(run.run_dir)}
    atomic_write_text(_path(run.key), json.dumps({
        "run": info, "tracking": tracking, "pending": pending, "reasons": entry.get("reasons", {}),
        "owner": {"pid": os.getpid(), "host": socket.gethostname()}}, default=str, indent=1) + "\n")


def cross_off(key: str, label: str) -> None:
    """``label`` holds everything of run ``key`` now; the entry goes when no backend is left."""
    entry = read(key)
    if entry is None or label not in entry["pending"]:
        return
    entry["pending"].remove(label)
    entry["reasons"].pop(label, None)
    if entry["pending"]:
        atomic_write_text(_path(key), json.dumps(entry, indent=1) + "\n")
    else:
        _path(key).unlink(missing_ok=True)


def note(key: str, label: str, reason: str) -> None:
    """Why ``label`` missed part of run ``key`` (shown by ``sync``)."""
    entry = read(key)
    if entry is not None and label in entry["pending"]:
        entry["reasons"][label] = reason
        atomic_write_text(_path(key), json.dumps(entry, indent=1) + "\n")


def read(key: str) -> dict[str, Any] | None:
    try:
        return json.loads(_path(key).read_text())
    except (OSError, ValueError):  # absent, or unreadable: nothing known to be pending
        return None


def entries() -> list[dict[str, Any]]:
    folder = ledger_dir()
    found = [read(path.stem) for path in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    return [entry for entry in found if entry is not None]


def owner_alive(entry: dict[str, Any]) -> bool:
    """Whether the process that entered the run still runs (on this host; another host's is assumed alive)."""
    owner = entry.get("owner", {})
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):  # someone else's process, or no pid recorded
        return True
    return True


def run_info(entry: dict[str, Any]) -> RunInfo:
    fields = dict(entry["run"])
    return RunInfo(**{**fields, "run_dir": Path(fields["run_dir"]), "resuming": True})


def read_history(path: Path) -> list[dict[str, float]]:
    """history.tsv's rows (a blank cell: the row lacks that column), numbers as floats, epochs as ints."""
    lines = path.read_text().splitlines()
    if not lines:
        return []
    columns = lines[0].split("\t")
    rows = []
    for line in lines[1:]:
        cells = dict(zip(columns, line.split("\t")))
        row: dict[str, float] = {k: float(v) for k, v in cells.items() if v != ""}
        row["epoch"] = int(row["epoch"])
        rows.append(row)
    return rows
