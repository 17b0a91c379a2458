"""The shared trial budget and interrupted trials, through Optuna's public API.

Budget. ``sweep.n_trials`` counts the trials that *use* the budget: complete, pruned, failed by their
own error, and those a live worker is running or that wait in the queue. A worker checks the count
after each trial (``StopAtBudget``, a callback that stops ``study.optimize`` as
``optuna.study.MaxTrialsCallback`` does) and again inside the objective, once the storage has
numbered the trial: two workers can ask at the same instant, and as storages number trials in the
order they create them, the budget goes to the lowest numbers and a surplus trial steps back (failed,
marked ``interrupted``, not counted).

Why not ``MaxTrialsCallback`` itself (re-checked against Optuna 5.1, optuna/_callbacks.py and its
documentation): it counts ``study.get_trials(states=...)`` after a trial has *finished* and then calls
``study.stop()``. So (1) N workers that each start one more trial before seeing the count overshoot
by up to N - 1 trials, and (2) it counts by state alone, and a trial failed by its own error (a
verdict on its parameters: counted) and one whose worker died (no verdict: replaced by a retry that
is counted instead) are both ``FAIL``; counting FAIL double-counts every killed trial, not counting it
lets a study of diverging parameters run forever. The count here is ``MaxTrialsCallback``'s with
those two distinctions: the trial's own ``error`` attribute, and the check at the trial's start.

Interrupted trials. A trial whose worker died (killed, pre-empted, out of memory) says nothing about
its parameters: it is failed without an ``error``, does not count, and Optuna's
``RetryHeartbeatStaleTrialCallback`` queues a copy with the same parameters, which the next free
worker runs (``retried_from`` names the original). Two detectors feed that callback:

- Optuna's heartbeat (RDB storages: SQLite, PostgreSQL, MySQL). Every running trial writes a
  heartbeat, and every worker fails the trials whose heartbeat is older than ``sweep.heartbeat.grace_s``
  (``optuna.storages.fail_stale_trials``, which Optuna also runs before each trial). It sees workers on
  every machine, but only once the grace period has passed, and a journal file has no heartbeat.
- The process id, for workers on this machine (any storage, at once): each trial records the host,
  boot and process id of its worker; a trial of this host whose process is gone is failed
  (``study.tell(number, state=FAIL)``) the moment another worker looks. This is what a heartbeat cannot
  do: replace a killed trial seconds later, on a journal file too.

A worker whose budget is used waits while trials that can still end run elsewhere (a live worker
finishes them, a dead one's trial is failed by one of the detectors and replaced), so every ``run``
ends with the study complete.
"""

from __future__ import annotations

import copy
import datetime
import os
import socket
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from reproduce.config import HeartbeatConfig
from sweeps.storage import has_heartbeat, open_storage

ERROR_ATTR = "error"  # the trial's own exception: a verdict on its parameters, uses the budget
TRACEBACK_ATTR = "traceback"
INTERRUPTED_ATTR = "interrupted"  # why a trial ended without a verdict (surplus); not counted
WORKER_ATTR = "worker"  # host, boot, pid, device and threads of the process running the trial
EPOCHS_ATTR = "epochs_trained"  # how far the trial got (pruned and failed ones stop early)
# What a trial's run left in its user attributes; a retry starts without them (the retried copy must
# not look like a trial of the dead worker, or the next process-id check would fail it at once).
RUN_ATTRS = (ERROR_ATTR, TRACEBACK_ATTR, INTERRUPTED_ATTR, WORKER_ATTR, EPOCHS_ATTR)


def study_storage(url: str, heartbeat: HeartbeatConfig | None = None) -> optuna.storages.BaseStorage:
    """The storage with the heartbeat's stale trials replaced as a killed worker's are."""
    return open_storage(url, heartbeat, on_stale_trial=replace_interrupted)


def retried_from(trial: FrozenTrial) -> int | None:
    """The number of the interrupted trial this one retries, if it is a retry."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def uses_budget(trial: FrozenTrial) -> bool:
    """A trial takes a place in the budget once it has a verdict (complete, pruned, failed by its own
    error), while a live worker runs it, and while it waits in the queue (enqueued or a retry)."""
    if trial.state == TrialState.FAIL:
        return ERROR_ATTR in trial.user_attrs
    return True


def budget_used(study: optuna.Study, below_number: int) -> int:
    """Places taken by the trials numbered below ``below_number``."""
    return sum(uses_budget(trial) for trial in study.get_trials(deepcopy=False) if trial.number < below_number)


def budget_started(study: optuna.Study) -> int:
    """Places taken by trials that have started: waiting trials are still to be asked for (asking
    pops them first)."""
    return sum(uses_budget(trial) for trial in study.get_trials(deepcopy=False) if trial.state != TrialState.WAITING)


def failure_reason(trial: FrozenTrial) -> str:
    if ERROR_ATTR in trial.user_attrs:
        return str(trial.user_attrs[ERROR_ATTR])
    if INTERRUPTED_ATTR in trial.user_attrs:
        return f"interrupted ({trial.user_attrs[INTERRUPTED_ATTR]}); not counted"
    # A killed worker's trial is retried (trials.csv: retry_of); one stopped by Ctrl-C, which Optuna fails
    # itself, is not: the budget runs a new trial in its place.
    return "interrupted (its worker stopped before the trial ended); not counted"


def replace_interrupted(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue an interrupted trial's parameters again (Optuna's retry callback), without the dead run's marks."""
    clean = copy.deepcopy(trial)
    clean.user_attrs = {key: value for key, value in trial.user_attrs.items() if key not in RUN_ATTRS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback()(study, clean)
    print(f"[{study.study_name}] trial {trial.number}: its worker stopped mid-trial; marked failed (not counted), "
          f"its parameters queued again", flush=True)


# ----------------------------------------------------------------------------------------------
# Which process runs a trial, and whether it is still alive


def this_worker(**extra: Any) -> dict[str, Any]:
    """This process, as a trial records it; ``extra``: what else the worker says about itself."""
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(),
            "started": _process_start(os.getpid()), **extra}


def _process_start(pid: int) -> str | None:
    """When the process started (clock ticks since boot): a recycled process id belongs to a process
    that started later, so an id alone could take a long-dead worker for a live one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name before ")" may hold spaces


def _boot_id() -> str:
    """Tells a machine's boots apart: after a reboot, every recorded process id is dead."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def worker_is_dead(worker: dict[str, Any], here: dict[str, Any]) -> bool:
    if worker.get("host") != here["host"]:
        return False  # another machine's worker: the heartbeat decides
    if worker.get("boot") != here["boot"]:
        return True
    try:
        os.kill(int(worker["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        pass
    started = worker.get("started")
    return started is not None and _process_start(int(worker["pid"])) not in (None, started)


def fail_interrupted_trials(study: optuna.Study) -> None:
    """Fail (and queue again) the running trials whose worker is gone: by process id on this machine,
    by Optuna's heartbeat everywhere (RDB storages)."""
    here = this_worker()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR)
        if not worker or not worker_is_dead(worker, here):
            continue
        try:
            # Only one worker wins this write (the storage refuses to finish a finished trial twice),
            # so only one queues the replacement.
            failed = study.tell(trial.number, state=TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError):  # finished by another worker
            continue
        replace_interrupted(study, failed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # calls replace_interrupted for what it fails


def trials_to_wait_for(study: optuna.Study, storage: optuna.storages.BaseStorage, grace_s: int) -> list[FrozenTrial]:
    """Running trials that will end without this worker: a live worker finishes them, or one of the
    two detectors fails a dead worker's trial. A journal file's trial of another machine is not waited
    for: nothing here could tell that its worker died. ``storage``: the study's, as opened."""
    here, heartbeat = this_worker(), has_heartbeat(storage)
    waiting = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR)
        if worker is None:  # just asked for: its worker records itself within the first second
            started = trial.datetime_start or datetime.datetime.now()
            if (datetime.datetime.now() - started).total_seconds() < grace_s:
                waiting.append(trial)
        elif worker.get("host") == here["host"] or heartbeat:
            waiting.append(trial)
    return waiting


class StopAtBudget:
    """``MaxTrialsCallback`` with this study's count (see the module's docstring): stop ``optimize``
    once the started trials fill the budget, after replacing the interrupted ones."""

    def __init__(self, n_trials: int) -> None:
        self.n_trials = n_trials

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        fail_interrupted_trials(study)
        if budget_started(study) >= self.n_trials:
            study.stop()
