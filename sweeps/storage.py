"""Where a study lives: SQLite by default, any SQLAlchemy database URL (PostgreSQL or MySQL for many
machines), or a journal file; with Optuna's heartbeat and the retry of interrupted trials. A storage
that cannot be used (a corrupt file, a server that does not answer) is one line naming it and the fix.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial

from reproduce.errors import UserError
from reproduce.config import HeartbeatConfig

STORAGE_ATTEMPTS = 5
# A database server that does not answer fails the command after this long instead of the driver's
# default (PostgreSQL's libpq waits forever on a host that drops packets).
CONNECT_TIMEOUT_S = 10
SERVER_SCHEMES = ("postgresql", "mysql")


class StorageError(UserError):
    """The study's storage cannot be opened, read or reached."""


def redact(url: str) -> str:
    """A storage URL fit to print or write into results: no password."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def _explain(url: str, reason: str) -> str:
    reason = reason.strip().splitlines()[0] if reason.strip() else "unknown error"
    if url.startswith("journal:"):
        path = url.removeprefix("journal:")
        return (f"study storage {path}: not an Optuna journal file it can read ({reason}); move it aside "
                f"(mv {path} {path}.bad) and rerun to start the study afresh, or point sweep.storage / --storage "
                f"elsewhere")
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        return (f"study storage {path}: not an SQLite database Optuna can read ({reason}); move it aside "
                f"(mv {path} {path}.bad) and rerun to start the study afresh, or point sweep.storage / --storage "
                f"elsewhere")
    return (f"study storage {redact(url)}: cannot use it ({reason}); start the database server or fix the URL "
            f"(sweep.storage or --storage), then rerun: the study resumes where it stopped")


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn the database driver's errors into one line naming the storage and the fix."""
    try:
        yield
    except sqlalchemy.exc.DBAPIError as error:  # the driver's own errors: connection, corrupt file, ...
        raise StorageError(_explain(url, str(error.orig))) from None


StaleTrialCallback = Callable[[optuna.Study, FrozenTrial], None]


def open_storage(url: str, heartbeat: HeartbeatConfig | None = None,
                 on_stale_trial: StaleTrialCallback | None = None) -> optuna.storages.BaseStorage:
    """``journal:PATH`` (a journal file, for many processes on one machine or a shared disk) or any
    SQLAlchemy database URL, read once here so that a storage that cannot be used fails at once.
    ``on_stale_trial``: what the heartbeat does with a trial it failed (RDB storages)."""
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            _check_journal(path)
            storage = JournalStorage(JournalFileBackend(str(path)))
            optuna.get_all_study_names(storage)
        except ValueError as error:  # undecodable bytes, a line that is not JSON
            raise StorageError(_explain(url, f"{type(error).__name__}: {error}")) from None
        return storage
    heartbeat = heartbeat or HeartbeatConfig()
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # Several workers write to one SQLite file: wait for the write lock instead of failing at once.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    else:
        # A server closes idle connections (and a worker idles for a whole trial): test each one
        # before use instead of failing the next write.
        engine_kwargs = {"pool_pre_ping": True}
        if url.startswith(SERVER_SCHEMES):
            engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat: experimental
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                     heartbeat_interval=heartbeat.interval_s,
                                                     grace_period=heartbeat.grace_s,
                                                     heartbeat_stale_trial_callback=on_stale_trial)
                optuna.get_all_study_names(storage)
            return storage
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as error:
            # Workers started together on a new PostgreSQL database all create Optuna's tables; the
            # losers of that race get a duplicate-key or duplicate-table error. The tables are created
            # in one transaction, so a second look finds them complete.
            if attempt == STORAGE_ATTEMPTS - 1:
                raise StorageError(_explain(url, str(error.orig))) from None
            time.sleep(0.2 + random.random())
        except sqlalchemy.exc.DBAPIError as error:
            raise StorageError(_explain(url, str(error.orig))) from None
    raise AssertionError("unreachable")


def _check_journal(path: Path) -> None:
    """Every line JSON and the last one complete. Optuna skips an undecodable last line (a write cut
    off) and appends after it, which breaks that line and the study with an AssertionError later."""
    data = path.read_bytes() if path.is_file() else b""
    if data and not data.endswith(b"\n"):
        raise ValueError("its last line is incomplete")
    for line in data.splitlines():
        json.loads(line)


def has_heartbeat(storage: optuna.storages.BaseStorage) -> bool:
    """Whether running trials write a heartbeat (RDB storages opened with one)."""
    interval = getattr(storage, "get_heartbeat_interval", None)
    return interval is not None and interval() is not None


def load_existing_study(name: str, url: str) -> optuna.Study:
    storage = open_storage(url)
    names = optuna.get_all_study_names(storage)
    if name not in names:
        raise StorageError(f"no study {name!r} in {redact(url)} (studies there: {', '.join(names) or 'none'}); run "
                           f"`python -m sweeps run` first, or pick one with --study")
    return optuna.load_study(study_name=name, storage=storage)
