"""One writer per run: an advisory lock (``fcntl.flock``) on ``<checkpoint_dir>/run.lock``.

The lock file sits in the checkpoint folder, outside DVC's outputs (DVC deletes and caches runs/<method>/,
never checkpoints/), and records its owner: pid, host, the process' start time and the command. A second
process on the same run fails at once naming the owner (``RunLockedError``, one line, exit code 2).

The kernel releases a flock when its owner dies, so a killed run leaves a lock file that is free: the next
run takes it over and says whose it was. A lock can also outlive its owner in a child that inherited the
descriptor (a forked data-loader worker still exiting); when the recorded owner is gone from this host the
lock is stale: its file is replaced by a new one (the orphan keeps the old, unlinked one) and the run
says so. An owner on another host cannot be checked from here; the message names it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from reproduce.errors import UserError
from reproduce.io import process_running

LOCK_NAME = "run.lock"
ATTEMPTS = 5  # a lock file replaced under us by another taker is retried (each try is one open and flock)


class RunLockedError(UserError):
    """Another live process is writing this run."""


def start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux): a reused pid has another start."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in parentheses may hold spaces


def owner_running(owner: dict[str, Any]) -> bool:
    """Whether the recorded owner still runs, as far as this host can tell (another host's: assumed so)."""
    if owner.get("host") != socket.gethostname():
        return True
    pid = owner.get("pid")
    if not isinstance(pid, int) or not process_running(pid):
        return False
    return owner.get("started") is None or start_ticks(pid) in (None, owner["started"])


def describe(owner: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["time"])) if "time" in owner else "?"
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, since {since}"


@contextmanager
def run_lock(checkpoint_dir: Path, run_dir: Path) -> Iterator[Path]:
    """Hold the run's lock for the ``with`` block (yields the lock file); ``RunLockedError`` if a live
    process holds it."""
    path = Path(checkpoint_dir) / LOCK_NAME
    stream = _acquire(path, run_dir)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)  # before unlocking: a waiter then finds the file gone and makes a new one
        fcntl.flock(stream, fcntl.LOCK_UN)
        stream.close()
        with contextlib.suppress(OSError):  # a run that wrote nothing leaves no folder behind
            path.parent.rmdir()


def _acquire(path: Path, run_dir: Path) -> Any:
    for _ in range(ATTEMPTS):
        path.parent.mkdir(parents=True, exist_ok=True)  # (again: a finished holder removes it when empty)
        try:
            stream = path.open("a+")  # never truncates: the owner's record stays readable until we hold the lock
        except FileNotFoundError:  # the folder went between the two lines
            continue
        try:
            fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(stream)
            stream.close()
            if owner is None or owner_running(owner):
                shown = describe(owner) if owner else "a process that has not written its record yet"
                raise RunLockedError(f"{run_dir}: another process is writing this run ({shown}; lock {path}); "
                                     f"wait for it or stop it; if it is gone, delete {path}") from None
            print(f"[reproduce] {path}: the lock of {describe(owner)} is stale (that process is gone, a child "
                  f"of it still holds the lock); taking it over", flush=True)
            path.unlink(missing_ok=True)
            continue
        if not _still_linked(stream, path):  # its holder replaced or released the file while we waited
            stream.close()
            continue
        previous = _read_owner(stream)
        if previous is not None:
            print(f"[reproduce] {path}: taking over the lock of {describe(previous)}, which ended without "
                  f"releasing it (killed?)", flush=True)
        _write_owner(stream)
        return stream
    raise RunLockedError(f"{run_dir}: could not take the lock {path} ({ATTEMPTS} tries, other processes keep "
                         f"replacing it); run one process per run")


def _still_linked(stream: Any, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(stream.fileno()).st_ino
    except FileNotFoundError:
        return False


def _read_owner(stream: Any) -> dict[str, Any] | None:
    stream.seek(0)
    try:
        owner = json.loads(stream.read() or "null")
    except ValueError:  # a record cut short by a kill: nobody's
        return None
    return owner if isinstance(owner, dict) else None


def _write_owner(stream: Any) -> None:
    stream.seek(0)
    stream.truncate()
    stream.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": start_ticks(os.getpid()),
                             "time": time.time(), "command": " ".join(sys.argv)[:300]}) + "\n")
    stream.flush()
