"""The Tracker: one run, sent live to every tracking backend the config wants (backend.py).

Each backend of a run gets a daemon thread of its own that makes its calls in order (a ``_Channel``),
starting with the run's start (importing the library, opening the run), so training never waits on a
tracking service except when a run ends (bounded by CLOSE_TIMEOUT_S) or a nested run's parent is being
started (bounded by START_TIMEOUT_S).
A backend that raises or does not answer is switched off for its destination for the rest of the
process, after that one wait and with one warning; the runs it misses stay in the pending-runs ledger
(ledger.py) for a rerun or `python -m reproduce.tracking sync` to complete from the run's files.

A process that ends with runs open (an error outside the engine, a worker that stops) suspends them
from an ``atexit`` hook, re-registered after every backend start (by the channel that started it) so
that it runs before the exit hook
W&B registers when it starts its service. ``atexit`` suffices because the channels are plain threads
and MLflow is called synchronously in them: concurrent.futures executors (which MLflow's own
asynchronous logging uses) stop taking work before ``atexit`` hooks run."""

from __future__ import annotations

import atexit
import errno
import os
import queue
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from reproduce.config import TrackingConfig
from reproduce.tracking import ledger
from reproduce.tracking.backend import BACKENDS, JOB_TYPES, STATUSES, Backend, RunInfo, flatten
from reproduce.tracking.provenance import context_tags

# W&B and MLflow write into $HOME and /tmp unless told otherwise, and phone home: keep both inside the
# project and quiet. Users can still point them elsewhere through the environment.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
# A tracking service that is down costs one bounded wait per process: MLflow's HTTP timeout with one
# retry (~20 s, not its default minutes), W&B's start timeout (15 s, not its default 90 s).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("WANDB_INIT_TIMEOUT", "15")

# Ending a run drains its channel and uploads the final checkpoint; a remote server may take a while.
CLOSE_TIMEOUT_S = 300.0
# A start is bounded by the services' own timeouts (set above) when the network is the problem; this
# only caps one that hangs past them. It is long because a start also imports the library and may
# wait for another process creating the same SQLite store: 60 s was exceeded on a loaded 2-core machine.
START_TIMEOUT_S = CLOSE_TIMEOUT_S
SYNC_HINT = "`python -m reproduce.tracking sync`"

_DOWN: dict[str, str] = {}  # destination -> why it was switched off, for the rest of this process
_OPEN: list[Tracker] = []  # runs this process has neither finished nor suspended


class _Channel:
    """One backend of one run: its calls run in order on a daemon thread; the first that raises stops it
    (later calls are dropped), as does its destination going down for another run."""

    def __init__(self, backend: Backend, destination: str) -> None:
        self.backend, self.destination = backend, destination
        self.failure: tuple[str, BaseException] | None = None
        self.opened, self.done = threading.Event(), threading.Event()
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._work, name=f"tracking-{backend.label}", daemon=True).start()

    def submit(self, action: str, call: Callable[..., None], *args: Any) -> None:
        """``action`` names the call in messages ("start", "log", "finish")."""
        self._calls.put((action, call, args))

    def end(self) -> None:
        self._calls.put(None)

    def _work(self) -> None:
        while (item := self._calls.get()) is not None:
            action, call, args = item
            if self.failure is None and self.destination not in _DOWN:
                try:
                    call(*args)
                except Exception as error:  # noqa: BLE001  (a tracking outage must never end training)
                    self.failure = (action, error)
            if action == "start":
                _exit_hook_runs_first()  # after the service registered its own exit hook
                self.opened.set()
        self.done.set()


class Tracker:
    """One run in every configured backend: per-epoch metrics, images, artefacts, and a final summary."""

    def __init__(self, config: TrackingConfig, *, run_dir: Path, run_name: str, tags: dict[str, str],
                 params: dict[str, Any], resume_key: str | None = None, enabled: bool = True,
                 parent: Tracker | None = None, history: list[dict[str, float]] | None = None,
                 job_type: str | None = None) -> None:
        """``resume_key``: the ``key`` of a run to continue, with ``history`` its epochs so far (history.tsv's
        rows): each backend is sent those it lacks. ``enabled=False`` tracks nothing (DDP ranks other than
        0, untracked runs). ``parent``: the run this one nests under (a sweep's study). ``job_type``:
        "train", "sweep" or "analysis" (default: "sweep" under a parent, else "train"). The W&B group (and
        MLflow tag ``group``) of a training run is ``<experiment>-<method>``, the experiment being
        ``dvc exp run``'s name or ``tracking.group``; a nested run takes its parent's group."""
        self.run_dir, self.name, self.key = Path(run_dir), run_name, resume_key or uuid.uuid4().hex[:16]
        job_type = job_type or ("sweep" if parent else "train")
        if job_type not in JOB_TYPES:
            raise ValueError(f"job_type {job_type!r}: use one of {JOB_TYPES}")
        experiment = os.environ.get("DVC_EXP_NAME") or config.group
        if parent:
            self.group = parent.group
        elif job_type == "train" and "method" in tags:
            self.group = f"{experiment}-{tags['method']}"
        else:  # a study's run groups under the study's name (tracking.group); the analysis under the experiment
            self.group = experiment if job_type == "analysis" else config.group
        self._channels: list[_Channel] = []
        if enabled:
            info = RunInfo(self.key, run_name, self.group, job_type, self.run_dir, {**context_tags(), **tags}, params,
                           int(time.time() * 1000), resume_key is not None, parent.key if parent else None)
            if parent is not None:  # a nested run names its parent: the parent must exist in the services first
                parent.wait_started()
            self._open(config, info, history or [], None)

    @classmethod
    def reopen(cls, entry: dict[str, Any], history: list[dict[str, float]]) -> Tracker:
        """The run a ledger entry lists, in the backends still pending for it (repair and sync)."""
        from reproduce.config import config_from_dict

        info = ledger.run_info(entry)
        tracker = cls.__new__(cls)
        tracker.run_dir, tracker.name, tracker.key, tracker.group = info.run_dir, info.name, info.key, info.group
        tracker._channels = []
        tracker._open(config_from_dict({"tracking": entry["tracking"]}).tracking, info, history, set(entry["pending"]))
        return tracker

    def _open(self, config: TrackingConfig, info: RunInfo, history: list[dict[str, float]],
              labels: Collection[str] | None) -> None:
        backends = [cls(config, info) for _, cls in BACKENDS.items()
                    if cls.wanted(config) and (labels is None or cls.label in labels)]
        if not backends:
            return
        _keep_wandb_state_in_project()
        try:  # listed before any service is contacted: from here on, a kill leaves it to be repaired
            ledger.enter(info, config.model_dump(), [backend.label for backend in backends])
        except OSError as error:
            if _disk_full(error):  # the services' local files would fail next: one message for all
                destinations = [f"{b.label} {b.destination(config)}" for b in backends] + ["ledger"]
                self._switch_off(destinations, [b.label for b in backends], "start", error)
            elif "ledger" not in _DOWN:
                _DOWN["ledger"] = str(error)
                warnings.warn(f"tracking: cannot list runs for a later sync in {ledger.ledger_dir()} ({error}); "
                              f"set REPRODUCE_TRACKING_DIR to a writable folder", stacklevel=3)
        for backend in backends:
            destination = f"{backend.label} {backend.destination(config)}"
            if destination in _DOWN:  # the ledger lists the run for this backend: sync sends it later
                _quietly(ledger.note, info.key, backend.label, f"not sent: {_DOWN[destination]} earlier in this process")
                continue
            channel = _Channel(backend, destination)
            channel.submit("start", backend.open)
            if history:
                channel.submit("log", backend.log, [dict(row) for row in history])
            self._channels.append(channel)
        # Training goes on while the services start: the first epochs queue behind the start. A process
        # that exits meanwhile suspends the run from the exit hook once its start is through.
        _OPEN.append(self)
        _exit_hook_runs_first()

    def wait_started(self) -> None:
        """Wait (at most START_TIMEOUT_S) until every backend has started this run, or failed to."""
        deadline = time.monotonic() + START_TIMEOUT_S
        for channel in self._channels:
            if not channel.opened.wait(max(0.0, deadline - time.monotonic())) and channel.failure is None:
                channel.failure = ("start", TimeoutError(f"no answer within {START_TIMEOUT_S:g} s"))
        self._report_failures()

    def log_epoch(self, row: dict[str, float]) -> None:
        """One epoch's numbers, at step ``row["epoch"]``; sent in the background."""
        self._send("log", lambda backend: backend.log, [dict(row)])

    def log_image(self, name: str, path: Path) -> None:
        self._send("image", lambda backend: backend.image, name, Path(path).resolve())

    def log_artifact(self, path: Path, kind: str = "model") -> None:
        self._send("artifact", lambda backend: backend.artifact, Path(path).resolve(), kind)

    def finish(self, summary: dict[str, Any] | None = None, status: str = "finished") -> None:
        """End the run (``finished``, ``failed`` or ``pruned``); the summary's numbers become MLflow
        metrics (``best.test.student.top1``) and W&B summary entries."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r}: use one of {sorted(STATUSES)}")
        self._close("finish", lambda backend: backend.finish, flatten(summary or {}), status)

    def suspend(self) -> None:
        """The process stops before the last epoch (pre-empted); a Tracker with the same key continues the run."""
        self._close("suspend", lambda backend: backend.suspend)

    def _send(self, action: str, method: Callable[[Backend], Callable[..., None]], *args: Any) -> None:
        self._report_failures()
        for channel in self._channels:
            channel.submit(action, method(channel.backend), *args)

    def _close(self, action: str, method: Callable[[Backend], Callable[..., None]], *args: Any) -> None:
        """Every channel makes its last call and stops; together they get CLOSE_TIMEOUT_S."""
        channels = self._channels
        _OPEN[:] = [tracker for tracker in _OPEN if tracker is not self]
        for channel in channels:
            channel.submit(action, method(channel.backend), *args)
            channel.end()
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        for channel in channels:
            if not channel.done.wait(max(0.0, deadline - time.monotonic())) and channel.failure is None:
                channel.failure = (action, TimeoutError(f"no answer within {CLOSE_TIMEOUT_S:g} s"))
            elif channel.failure is None and channel.destination not in _DOWN:
                _quietly(ledger.cross_off, self.key, channel.backend.label)
        self._report_failures()
        self._channels = []

    def _report_failures(self) -> None:
        failed = [channel for channel in self._channels if channel.failure is not None]
        if not failed:
            return
        self._channels = [channel for channel in self._channels if channel.failure is None]
        if any(_disk_full(channel.failure[1]) for channel in failed):  # every local write fails alike: one message
            channels = failed + self._channels
            action, error = next(channel.failure for channel in failed if _disk_full(channel.failure[1]))
            self._channels = []
            self._switch_off([c.destination for c in channels] + ["ledger"], [c.backend.label for c in channels],
                             action, error)
            return
        for channel in failed:
            action, error = channel.failure
            self._switch_off([channel.destination], [channel.backend.label], action, error)

    def _switch_off(self, destinations: list[str], labels: list[str], action: str, error: BaseException) -> None:
        """Turn ``destinations`` off for this process with one warning (none if they already were)."""
        reason = f"{action} failed ({_describe(error)})"
        for label in labels:
            _quietly(ledger.note, self.key, label, reason)
        fresh = [destination for destination in destinations if destination not in _DOWN]
        _DOWN.update({destination: reason for destination in destinations})
        if any(destination != "ledger" for destination in fresh):
            names = ", ".join(dict.fromkeys(labels))
            advice = "free some space, then run" if _disk_full(error) else "the runs it misses are kept for"
            warnings.warn(f"{names}: {reason}; {names} logging is off for the rest of this process ({advice} "
                          f"{SYNC_HINT})", stacklevel=5)


def _describe(error: BaseException) -> str:
    """The root cause in one line: libraries wrap a database error in two more, each with a traceback's
    worth of text."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line for line in str(error).splitlines() if line.strip()] or [""]
    return f"{type(error).__name__}: {lines[0][:600]}"


def _disk_full(error: BaseException) -> bool:
    return (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "disk is full" in str(error) \
        or "No space left on device" in str(error)


def _quietly(call: Callable[..., None], *args: Any) -> None:
    """A ledger update; one that fails (a full disk) leaves the run listed as it was, which errs safe."""
    try:
        call(*args)
    except OSError:
        pass


def _keep_wandb_state_in_project() -> None:
    # W&B's state stays in the project (run from its root), not $HOME; not ".wandb": wandb would write
    # its runs into <WANDB_DIR>/.wandb instead of <WANDB_DIR>/wandb if that existed.
    os.environ.setdefault("WANDB_DIR", os.getcwd())
    for variable, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"), ("WANDB_CONFIG_DIR", "config")):
        os.environ.setdefault(variable, os.path.join(os.getcwd(), ".wandb-state", sub))


def _suspend_open() -> None:
    """A process that ends without finishing its runs leaves them resumable rather than running forever."""
    for tracker in list(_OPEN):
        tracker.suspend()


def _exit_hook_runs_first() -> None:
    """``atexit`` runs hooks last-registered first: moving ours to the end puts it before W&B's teardown."""
    atexit.unregister(_suspend_open)
    atexit.register(_suspend_open)


def forget_outages() -> None:
    """Try every backend again from the next run on (a long-lived process whose server is back)."""
    _DOWN.clear()
