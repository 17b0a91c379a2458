"""Running a study: storage, the shared trial budget, interrupted trials, the objective, the workers.

Budget. ``sweep.n_trials`` counts the trials that *use* the budget: complete, pruned, failed by their
own error, and those a live worker is running or that wait in the queue. A worker checks the count
after each trial (a callback that stops ``study.optimize``, as ``optuna.study.MaxTrialsCallback``
does) and again inside the objective, once the storage has numbered the trial: two workers can ask
at the same instant, and as storages number trials in the order they create them, the budget goes
to the lowest numbers and a surplus trial steps back (failed, marked ``interrupted``, not counted).
``MaxTrialsCallback`` alone cannot keep this budget: it only looks after a trial has finished, so N
workers that each start one more trial before seeing the count overshoot by up to N - 1, and it
counts by state, so it cannot tell a trial that failed by its own error (a verdict: counted) from
one whose worker died (no verdict: replaced).

Interrupted trials. A trial whose worker died (killed, pre-empted, out of memory) says nothing about
its parameters: it is failed without an ``error``, does not count, and Optuna's
``RetryHeartbeatStaleTrialCallback`` (formerly ``RetryFailedTrialCallback``) queues a copy with the
same parameters, which the next free worker runs; the copy names the original
(``system_attrs["failed_trial"]``). Two detectors feed that callback:

- Optuna's heartbeat (RDB storages: SQLite, PostgreSQL, MySQL). Every running trial writes a
  heartbeat, and every worker fails the trials whose heartbeat is older than ``sweep.heartbeat.grace_s``
  (``optuna.storages.fail_stale_trials``, which Optuna also runs before each trial). It sees workers
  on every machine, but only once the grace period has passed, and a journal file has no heartbeat.
- The process id, for workers on this machine (any storage, at once): each trial records the host,
  boot and process id of its worker; a trial of this host whose process is gone is failed the moment
  another worker looks. This is what a heartbeat cannot do: replace a killed trial seconds later, on
  a journal file too.

A worker whose budget is used waits while trials that can still end run elsewhere (a live worker
finishes them, a dead one's trial is failed by one of the detectors and replaced), so every
``run`` ends with the study complete and writes complete results.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import random
import re
import shutil
import socket
import time
import traceback
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy.exc
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from reproduce.config import Config, ConfigError, config_from_dict
from reproduce.data.prepare import MANIFEST
from reproduce.train import EpochCallback, RunSpec, train
from reproduce.io import atomic_write_text
from reproduce.methods import get_method
from reproduce.tracking import Tracker
from sweeps.settings import HeartbeatSettings, SweepSettings, load_settings, objectives, study_identity, study_name
from sweeps.space import SearchSpace, describe, parse_space

ERROR_ATTR = "error"  # the trial's own exception: a verdict on its parameters, uses the budget
TRACEBACK_ATTR = "traceback"
INTERRUPTED_ATTR = "interrupted"  # why a trial ended without a verdict (surplus); not counted
WORKER_ATTR = "worker"  # host, boot and pid of the process running the trial
EPOCHS_ATTR = "epochs_trained"  # how far the trial got (pruned and failed ones stop early)
# What a trial's run left in its user attributes; a retry starts without them (the retried copy must
# not look like a trial of the dead worker, or the next process-id check would fail it at once).
RUN_ATTRS = (ERROR_ATTR, TRACEBACK_ATTR, INTERRUPTED_ATTR, WORKER_ATTR, EPOCHS_ATTR)
RETRIED_ATTR = "failed_trial"  # system attribute Optuna's retry callback gives the copy: the original's number

RESULTS_ROOT = Path("sweeps/results")
STUDY_MARKER = "study.json"  # which study sweeps/results/<method> shows, and what its name's hash stands for
CHECKPOINTS_ROOT = Path("checkpoints/sweeps")  # rolling checkpoints, deleted when each trial ends
STORAGE_ATTEMPTS = 5
POLL_S = 2.0  # how often a worker with nothing left to start looks at the trials still running elsewhere
# Per-run files the engine writes that a sweep does not keep: nobody reloads the weights of many short
# trials (train the best parameters instead). metrics.json and history.tsv stay.
BULKY_RUN_FILES = ("final.pt", "best.pt", "predictions.pt", "code.tar.gz")


class BudgetSpent(RuntimeError):
    """Another worker took the last trials of the budget at the same moment as this one."""


class TrialPruned(optuna.TrialPruned):
    """Optuna's pruning signal, which the engine's trackers record as a pruned run (not a failed one)."""

    tracking_status = "pruned"


@dataclass(frozen=True)
class SweepJob:
    """Everything a worker needs; picklable, because workers are spawned processes."""

    config: Config  # the base configuration; each trial overrides methods.<method>.<param>
    method: str
    settings: SweepSettings
    space: SearchSpace
    study_name: str
    identity: dict[str, Any]
    track: bool = True  # the study a W&B and MLflow run, every trial a run nested under it
    quiet: bool = False  # no line per finished trial

    @property
    def storage_url(self) -> str:
        return self.settings.storage_url(self.method)

    @property
    def results_dir(self) -> Path:
        return RESULTS_ROOT / self.method


def plan_job(config: Config, method: str, *, track: bool = True, quiet: bool = False) -> SweepJob | None:
    """Validate the settings and the method's space; None when the space is empty (nothing to tune)."""
    settings = load_settings(config)
    method_cls = get_method(method)
    where = (f"sweep.spaces.{method}" if method in settings.spaces
             else f"{method_cls.__module__}.{method_cls.__qualname__}.search_space")
    space = parse_space(settings.raw_space(method), method, config.methods.get(method), where)
    if not space:
        return None
    identity = study_identity(config, method, settings, space)
    return SweepJob(config, method, settings, space, study_name(identity), identity, track, quiet)


# ----------------------------------------------------------------------------------------------
# Storage and study


def open_storage(url: str, heartbeat: HeartbeatSettings | None = None) -> optuna.storages.BaseStorage:
    """``journal:PATH`` (a journal file, for many processes on one machine or a shared disk) or any
    SQLAlchemy database URL (SQLite by default; PostgreSQL or MySQL for many machines), with Optuna's
    heartbeat and the retry of interrupted trials."""
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    heartbeat = heartbeat or HeartbeatSettings()
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # Several workers write to one SQLite file: wait for the write lock instead of failing at once.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    else:
        # A server closes idle connections (and a worker idles for a whole trial): test each one
        # before use instead of failing the next write.
        engine_kwargs = {"pool_pre_ping": True}
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat: experimental
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                  heartbeat_interval=heartbeat.interval_s,
                                                  grace_period=heartbeat.grace_s,
                                                  heartbeat_stale_trial_callback=replace_interrupted)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Workers started together on a new PostgreSQL database all create Optuna's tables; the
            # losers of that race get a duplicate-key or duplicate-table error. The tables are created
            # in one transaction, so a second look finds them complete.
            if attempt == STORAGE_ATTEMPTS - 1:
                raise
            time.sleep(0.2 + random.random())
    raise AssertionError("unreachable")


def has_heartbeat(storage: optuna.storages.BaseStorage) -> bool:
    # Asked, not isinstance(RDBStorage): a loaded study holds its storage inside Optuna's cache wrapper.
    interval = getattr(storage, "get_heartbeat_interval", None)
    return interval is not None and interval() is not None


def redact(url: str) -> str:
    """A storage URL fit to print or write into results: no password."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def create_or_load_study(job: SweepJob) -> optuna.Study:
    study = optuna.create_study(storage=open_storage(job.storage_url, job.settings.heartbeat),
                                study_name=job.study_name,
                                directions=[o.direction for o in objectives(job.settings.multi_objective)],
                                load_if_exists=True)
    if "identity" not in study.user_attrs:  # shown by optuna-dashboard: what the hash in the name stands for
        study.set_user_attr("identity", job.identity)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([o.name for o in objectives(job.settings.multi_objective)])
    return study


def load_existing_study(name: str, storage_url: str) -> optuna.Study:
    storage = open_storage(storage_url)
    if name not in optuna.get_all_study_names(storage):
        known = ", ".join(optuna.get_all_study_names(storage)) or "none"
        raise FileNotFoundError(f"no study {name!r} in {redact(storage_url)} (studies there: {known}); run "
                                f"`python -m sweeps run` first, or pick one with --study")
    return optuna.load_study(study_name=name, storage=storage)


# ----------------------------------------------------------------------------------------------
# The study's tracked run: every trial's run nests under it


_OPEN_STUDY_RUNS: dict[str, Tracker] = {}  # key -> this process's open study run, finished by write_results


def study_run_key(name: str, storage_url: str) -> str:
    """One run per study and storage, the same on every machine and every rerun: they all continue it."""
    return f"{name}-{hashlib.sha256(redact(storage_url).encode()).hexdigest()[:6]}"


def open_study_run(config: Config, method: str, name: str, storage_url: str, identity: dict[str, Any], *,
                   enabled: bool, wandb: bool = True) -> Tracker:
    """The study's run in W&B and MLflow (``run_name`` the study name); reopening continues it.
    ``wandb=False``: MLflow only, for a spawned worker while its parent process holds the run open. A
    trial nests under an MLflow run by its id, and under a W&B study by its group (the study's name),
    which needs no open W&B run; two processes writing one W&B run at once is what W&B does not take."""
    key = study_run_key(name, storage_url)
    if key in _OPEN_STUDY_RUNS:
        return _OPEN_STUDY_RUNS[key]
    tracking = copy.deepcopy(config.tracking)
    tracking.group = name
    tracking.wandb.enabled = tracking.wandb.enabled and wandb
    tags = {"method": method, "dataset": config.dataset.name, "teacher": config.models.teacher,
            "student": config.models.student, "study": name, "kind": "study"}
    tracker = Tracker(tracking, run_dir=RESULTS_ROOT / method, run_name=name, tags=tags,
                      params={"sweep": dataclasses.asdict(load_settings(config)), "study": identity,
                              "storage": redact(storage_url)},
                      resume_key=key, enabled=enabled)
    _OPEN_STUDY_RUNS[key] = tracker
    return tracker


def close_study_run(tracker: Tracker, summary: dict[str, Any] | None = None, status: str | None = None) -> None:
    """``finish`` with a status, or ``suspend`` (workers, interrupted runs: the study run goes on)."""
    for key, open_tracker in list(_OPEN_STUDY_RUNS.items()):
        if open_tracker is tracker:
            del _OPEN_STUDY_RUNS[key]
    if status is None:
        tracker.suspend()
    else:
        tracker.finish(summary or {}, status=status)


def take_study_run(name: str, storage_url: str) -> Tracker | None:
    """The study run this process has open, if any (``run_sweep`` leaves it open for ``write_results``)."""
    return _OPEN_STUDY_RUNS.get(study_run_key(name, storage_url))


# ----------------------------------------------------------------------------------------------
# The budget and interrupted trials


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


def replace_interrupted(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue an interrupted trial's parameters again (Optuna's retry callback), without the dead run's marks."""
    clean = copy.deepcopy(trial)
    clean.user_attrs = {key: value for key, value in trial.user_attrs.items() if key not in RUN_ATTRS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback()(study, clean)
    print(f"[{study.study_name}] trial {trial.number}: its worker stopped mid-trial; marked failed (not counted), "
          f"its parameters queued again", flush=True)


def this_worker() -> dict[str, Any]:
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(), "started": _process_start(os.getpid())}


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


def _worker_is_dead(worker: dict[str, Any], here: dict[str, Any]) -> bool:
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
    storage = study._storage  # Optuna's own fail_stale_trials works on it the same way
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR)
        if not worker or not _worker_is_dead(worker, here):
            continue
        try:
            # Only one worker wins this write (the others get UpdateFinishedTrialError), so only one
            # queues the replacement.
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        replace_interrupted(study, storage.get_trial(trial._trial_id))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # calls replace_interrupted for what it fails


def trials_to_wait_for(study: optuna.Study, grace_s: int) -> list[FrozenTrial]:
    """Running trials that will end without this worker: a live worker finishes them, or one of the
    two detectors fails a dead worker's trial. A journal file's trial of another machine is not waited
    for: nothing here could tell that its worker died."""
    here, heartbeat = this_worker(), has_heartbeat(study._storage)
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


# ----------------------------------------------------------------------------------------------
# One trial


def trial_config(job: SweepJob, params: dict[str, Any]) -> Config:
    raw = job.config.to_dict()
    raw["recipe"]["epochs"] = job.settings.epochs_per_trial
    raw["methods"][job.method] = {**(raw["methods"].get(job.method) or {}), **params}
    raw["runtime"]["quiet"] = True  # parallel workers' epoch bars would interleave; one line per trial instead
    raw["tracking"]["group"] = job.study_name  # a study's trials side by side in W&B and MLflow
    return config_from_dict(raw)


class TrialObjective:
    """Train one trial through the engine; its score is the primary network's last-epoch validation
    top-1 (and ECE): the trial's schedule is built to end there, and the test split is never used."""

    def __init__(self, job: SweepJob, parent: Tracker | None = None) -> None:
        self.job = job
        self.parent = parent
        self.primary = get_method(job.method).primary
        self.objectives = objectives(job.settings.multi_objective)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        job = self.job
        if budget_used(trial.study, below_number=trial.number) >= job.settings.n_trials:
            trial.set_user_attr(INTERRUPTED_ATTR, "surplus: other workers used the last of the budget")
            raise BudgetSpent(f"the budget of {job.settings.n_trials} trials was used by other workers")
        trial.set_user_attr(WORKER_ATTR, this_worker())
        params = {name: spec.suggest(trial, name) for name, spec in job.space.items()}
        spec = RunSpec(job.method, job.settings.seed, job.results_dir / "trials" / str(trial.number),
                       CHECKPOINTS_ROOT / job.study_name / str(trial.number))
        try:
            summary = train(trial_config(job, params), spec, resume="never", on_epoch_end=self._reporter(trial),
                            track=job.track, parent=self.parent)
        except optuna.TrialPruned:
            raise
        except Exception as error:  # a diverged loss (engine.DivergedError) lands here, with its message
            trial.set_user_attr(ERROR_ATTR, f"{type(error).__name__}: {error}")
            trial.set_user_attr(TRACEBACK_ATTR, traceback.format_exc(limit=-8))  # where, for optuna-dashboard
            raise
        finally:
            shutil.rmtree(spec.checkpoint_dir, ignore_errors=True)
            with contextlib.suppress(OSError):  # the study's folder, once no other worker uses it
                spec.checkpoint_dir.parent.rmdir()
            for name in BULKY_RUN_FILES:
                (spec.run_dir / name).unlink(missing_ok=True)
        values = tuple(summary["last"]["val"][self.primary][objective.metric] for objective in self.objectives)
        return values[0] if len(values) == 1 else values

    def _reporter(self, trial: optuna.Trial) -> EpochCallback:
        key = f"val/{self.primary}/{self.objectives[0].metric}"
        last_epoch = self.job.settings.epochs_per_trial
        prunes = not self.job.settings.multi_objective  # Optuna cannot prune multi-objective studies

        def report(epoch: int, row: dict[str, float]) -> None:
            trial.set_user_attr(EPOCHS_ATTR, epoch)
            if not prunes:
                return
            trial.report(row[key], epoch)
            # After the last epoch the training is done: pruning would only throw its result away.
            if epoch < last_epoch and trial.should_prune():
                raise TrialPruned(f"{key} {row[key]:.2f} at epoch {epoch}")

        return report


def trial_line(trial: FrozenTrial, objective_names: list[str]) -> str:
    """``trial 3 COMPLETE val_top1 91.04 | temperature=3.2 kd_weight=0.7 | 12.3 s``."""
    parts = [f"trial {trial.number} {trial.state.name}"]
    if trial.state == TrialState.COMPLETE:
        parts[0] += " " + " ".join(f"{name} {value:.4g}" for name, value in zip(objective_names, trial.values))
    elif trial.state == TrialState.PRUNED and trial.value is not None:  # the value is the last one reported
        parts[0] += f" after epoch {trial.user_attrs.get(EPOCHS_ATTR)}, {objective_names[0]} {trial.value:.4g}"
    elif trial.state == TrialState.FAIL:
        parts[0] += " " + failure_reason(trial)
    if RETRIED_ATTR in trial.system_attrs:
        parts[0] += f" (retry of trial {trial.system_attrs[RETRIED_ATTR]})"
    if trial.params:
        parts.append(describe(trial.params))
    if trial.duration is not None:
        parts.append(f"{trial.duration.total_seconds():.1f} s")
    return " | ".join(parts)


def failure_reason(trial: FrozenTrial) -> str:
    if ERROR_ATTR in trial.user_attrs:
        return str(trial.user_attrs[ERROR_ATTR])
    if INTERRUPTED_ATTR in trial.user_attrs:
        return f"interrupted ({trial.user_attrs[INTERRUPTED_ATTR]}); not counted"
    # A killed worker's trial is retried (trials.csv: retry_of); one stopped by Ctrl-C, which Optuna fails
    # itself, is not: the budget runs a new trial in its place.
    return "interrupted (its worker stopped before the trial ended); not counted"


# ----------------------------------------------------------------------------------------------
# Workers


class TrialSeededTPESampler(optuna.samplers.TPESampler):
    """TPE whose random draws for a trial are seeded by (``sweep.seed``, trial number). Workers that
    start together (processes, machines, reruns) then never replay one another's draws, as they would
    with one seed each, and a study run by one worker is reproducible, as it would not be with a seed
    per process. ``constant_liar``: trials still running count as poor results, so parallel workers
    spread out."""

    def __init__(self, study_seed: int, worker_seed: int) -> None:
        super().__init__(seed=worker_seed, constant_liar=True)
        self._study_seed = study_seed

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        seed = int(np.random.SeedSequence([self._study_seed, trial.number]).generate_state(1)[0])
        # Optuna exposes no way to set a sampler's seed after construction (reseed_rng draws a random
        # one); its two random states are these. Were they renamed, the draws stay seeded once per worker.
        for holder in (self, getattr(self, "_random_sampler", None)):
            state = getattr(getattr(holder, "_rng", None), "rng", None)
            if isinstance(state, np.random.RandomState):
                state.seed(seed)
        super().before_trial(study, trial)


def make_sampler(job: SweepJob, worker_index: int = 0) -> optuna.samplers.BaseSampler:
    # The seed per worker is only the fallback of TrialSeededTPESampler (see there).
    entropy = [job.settings.seed, worker_index, zlib.crc32(socket.gethostname().encode()), os.getpid()]
    return TrialSeededTPESampler(job.settings.seed, int(np.random.SeedSequence(entropy).generate_state(1)[0]))


def quiet_optuna() -> None:
    """Our line per trial (with a failed trial's error) replaces Optuna's log lines and tracebacks;
    the traceback stays in the trial's user attributes."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)


def run_worker(job: SweepJob, worker_index: int = 0, parent: Tracker | None = None) -> None:
    """Run trials until the study's budget is used (by this worker and every other one) and no trial
    that could still need replacing runs elsewhere. ``parent``: the study's tracked run (a spawned
    worker opens its own, continuing the same run)."""
    quiet_optuna()
    own_parent = parent is None
    if own_parent:
        parent = open_study_run(job.config, job.method, job.study_name, job.storage_url, job.identity,
                                enabled=job.track, wandb=False)
    try:
        study = optuna.load_study(study_name=job.study_name,
                                  storage=open_storage(job.storage_url, job.settings.heartbeat),
                                  pruner=job.settings.make_pruner())
        study.sampler = make_sampler(job, worker_index)
        names = [o.name for o in objectives(job.settings.multi_objective)]
        callbacks: list[Any] = [StopAtBudget(job.settings.n_trials)]
        if not job.quiet:
            callbacks.insert(0, lambda study, trial: print(f"[{study.study_name}] {trial_line(trial, names)}",
                                                           flush=True))
        objective = TrialObjective(job, parent)
        while True:
            fail_interrupted_trials(study)
            if budget_started(study) < job.settings.n_trials:
                study.optimize(objective, catch=(Exception,), callbacks=callbacks)
            elif trials_to_wait_for(study, job.settings.heartbeat.grace_s):
                time.sleep(POLL_S)
            else:
                return
    finally:
        if own_parent:
            close_study_run(parent)


def run_sweep(job: SweepJob) -> tuple[optuna.Study, list[str]]:
    """Create or resume the study and run its missing trials with ``settings.workers`` processes;
    returns once the budget is complete (what a worker process that died left is finished in this
    one). The list returned is empty: it stays for callers written when a crashed worker left the
    study unfinished. The study's tracked run stays open for ``sweeps.report.write_results``."""
    quiet_optuna()
    preflight(job.config, job.method)
    study = create_or_load_study(job)
    claim_results_dir(job.results_dir, job.study_name, job.storage_url, job.identity)
    parent = open_study_run(job.config, job.method, job.study_name, job.storage_url, job.identity, enabled=job.track)
    try:
        fail_interrupted_trials(study)
        used, budget, workers = budget_started(study), job.settings.n_trials, job.settings.workers
        print(f"[{job.study_name}] storage {redact(job.storage_url)}: {min(used, budget)}/{budget} trials done or "
              f"running; {max(budget - used, 0)} to run with {workers} worker(s), {job.settings.epochs_per_trial} "
              f"epochs each, {job.settings.describe_pruning()}", flush=True)
        if workers == 1:
            run_worker(job, parent=parent)  # also waits for trials other machines still run
            return study, []
        crashed = _run_worker_processes(_share_cpu_threads(job))
        if crashed:
            # The trials of the workers that died are queued again; finish them here, with every core.
            for line in crashed:
                print(f"[{job.study_name}] {line}; finishing the study in this process", flush=True)
            run_worker(job, parent=parent)
        return study, []
    except BaseException:
        close_study_run(parent)  # suspended: a rerun continues the study and its run
        raise


def run_study(config: Config, method: str, *, track: bool = True, quiet: bool = False) -> dict[str, Any] | None:
    """Run one method's study and write its results; returns the summary (``summary["best"]`` is None
    when no trial completed), or None when the method has nothing to tune. The CLI's ``run`` and a
    pipeline stage call this."""
    from sweeps.report import write_results

    job = plan_job(config, method, track=track, quiet=quiet)
    if job is None:
        return None
    study, _ = run_sweep(job)
    return write_results(study, job.method, job.config, storage_url=job.storage_url, track=job.track)


def _run_worker_processes(job: SweepJob) -> list[str]:
    # spawn, not fork: forking a process in which torch has started its thread pools can deadlock.
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=run_worker, args=(job, index), name=f"worker {index}")
                 for index in range(job.settings.workers)]
    for process in processes:
        process.start()
    # Reap each worker as soon as it exits: an unreaped (zombie) process still looks alive to the
    # others' process-id check, and its interrupted trial would not be replaced.
    pending = {process.sentinel: process for process in processes}
    crashed = []
    while pending:
        for sentinel in multiprocessing.connection.wait(list(pending)):
            process = pending.pop(sentinel)
            process.join()
            if process.exitcode != 0:
                crashed.append(f"{process.name} (pid {process.pid}) exited with code {process.exitcode}")
    return crashed


def _share_cpu_threads(job: SweepJob) -> SweepJob:
    """N workers each using every core would oversubscribe the CPU; give each its share unless
    runtime.threads says otherwise."""
    if job.config.runtime.threads > 0:
        return job
    config = copy.deepcopy(job.config)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    config.runtime.threads = max(1, cores // job.settings.workers)
    return dataclasses.replace(job, config=config)


def preflight(config: Config, method: str) -> None:
    """Fail before the first trial on what would fail every trial."""
    if config.dataset.val_fraction == 0:
        raise ConfigError(f"{method}: a sweep scores every trial on the validation split, and dataset.val_fraction "
                          f"is 0 (no validation split; the papers' protocol, which picks epochs on test). Set "
                          f"dataset.val_fraction > 0 (e.g. --set dataset.val_fraction=0.15, then `python -m "
                          f"reproduce prepare` again) to sweep; tuning on the test split would make every "
                          f"reported number optimistic")
    manifest = config.dataset.prepared_dir / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"no prepared dataset at {config.dataset.prepared_dir} (no {MANIFEST}); run "
                                f"`python -m reproduce prepare` (or `dvc repro`) first")
    counts = json.loads(manifest.read_text()).get("counts", {})
    if counts.get("val") == 0:
        raise ConfigError(f"{method}: a sweep scores every trial on the validation split, and the prepared dataset "
                          f"at {config.dataset.prepared_dir} has none (it was prepared with val_fraction 0); run "
                          f"`python -m reproduce prepare` again with dataset.val_fraction > 0")
    if get_method(method).kind.value == "offline" and not config.teacher.weights.is_file():
        raise FileNotFoundError(f"teacher weights not found at {config.teacher.weights}: {method} distils from the "
                                f"trained teacher; run `python -m reproduce stage --method teacher` (or `dvc repro`) "
                                f"first")


def claim_results_dir(results_dir: Path, name: str, storage_url: str, identity: dict[str, Any]) -> None:
    """``sweeps/results/<method>`` shows one study. What another study (other settings) left there
    would mix with this one's results; it goes, and that study keeps every number in its storage."""
    marker = results_dir / STUDY_MARKER
    shown = json.loads(marker.read_text()).get("study") if marker.is_file() else name
    if shown != name:
        shutil.rmtree(results_dir)
        print(f"[{name}] cleared {results_dir}: it showed study {shown}")
    results_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps({"study": name, "storage": redact(storage_url), "identity": identity},
                                         indent=2, sort_keys=True) + "\n")
