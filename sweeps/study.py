"""Running a study: storage, the shared trial budget, the objective and the worker processes.

Budget. ``sweep.n_trials`` counts the trials that *use* the budget: complete, pruned, failed by their
own error, and those a live worker is running or that wait in the queue. A worker checks the count
before it asks for a trial and again once the storage has numbered it: two workers can ask at the
same instant, and as storages number trials in the order they create them, the budget goes to the
lowest numbers and a surplus trial steps back (failed, marked ``interrupted``, not counted). This is
``optuna.study.MaxTrialsCallback`` made exact: the callback only looks after a trial has finished, so
N workers can overshoot by up to N - 1 and it cannot tell an interrupted trial from a failed one.

Interrupted trials. A trial whose worker died (killed, pre-empted, out of memory) says nothing about its
parameters: it is failed without an ``error``, does not count, and the budget runs a replacement.
Dead workers are found by process id on the same machine (at once, any storage) and by Optuna's
heartbeat on other machines (RDB storages; a journal file has no heartbeat).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import shutil
import socket
import traceback
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from reproduce.config import Config, config_from_dict
from reproduce.data.prepare import MANIFEST
from reproduce.engine import EpochCallback, RunSpec, train
from reproduce.io import atomic_write_text
from reproduce.methods import get_method
from sweeps.settings import SweepSettings, load_settings, objectives, study_identity, study_name
from sweeps.space import SearchSpace, describe, parse_space

ERROR_ATTR = "error"  # the trial's own exception: a verdict on its parameters, uses the budget
TRACEBACK_ATTR = "traceback"
INTERRUPTED_ATTR = "interrupted"  # why a trial ended without a verdict; it is replaced
WORKER_ATTR = "worker"  # host, boot and pid of the process running the trial
EPOCHS_ATTR = "epochs_trained"  # how far the trial got (pruned and failed ones stop early)

RESULTS_ROOT = Path("sweeps/results")
STUDY_MARKER = "study.json"  # which study sweeps/results/<method> shows, and what its name's hash stands for
CHECKPOINTS_ROOT = Path("checkpoints/sweeps")  # rolling checkpoints, deleted when each trial ends
HEARTBEAT_INTERVAL_S = 60
HEARTBEAT_GRACE_S = 180  # a trial silent this long on an RDB storage belongs to a dead worker
# Per-run files the engine writes that a sweep does not keep: nobody reloads the weights of many short
# trials (train the best parameters instead). metrics.json and history.tsv stay.
BULKY_RUN_FILES = ("final.pt", "best.pt", "predictions.pt", "code.tar.gz")


class BudgetSpent(RuntimeError):
    """Another worker took the last trials of the budget at the same moment as this one."""


@dataclass(frozen=True)
class SweepJob:
    """Everything a worker needs; picklable, because workers are spawned processes."""

    config: Config  # the base configuration; each trial overrides methods.<method>.<param>
    method: str
    settings: SweepSettings
    space: SearchSpace
    study_name: str
    identity: dict[str, Any]
    track: bool = True  # every trial a W&B and MLflow run (the engine's Tracker)
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
    space = parse_space(settings.spaces.get(method), method, config.methods.get(method))
    if not space:
        return None
    identity = study_identity(config, method, settings, space)
    return SweepJob(config, method, settings, space, study_name(identity), identity, track, quiet)


# ----------------------------------------------------------------------------------------------
# Storage and study


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """``journal:PATH`` (a journal file, for many processes on one machine or a shared disk) or any
    SQLAlchemy database URL (SQLite by default; PostgreSQL or MySQL for many machines)."""
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # Several workers write to one SQLite file: wait for the write lock instead of failing at once.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat, experimental since 2.9
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL_S,
                                          grace_period=HEARTBEAT_GRACE_S)


def redact(url: str) -> str:
    """A storage URL fit to print or write into results: no password."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def create_or_load_study(job: SweepJob) -> optuna.Study:
    study = optuna.create_study(storage=open_storage(job.storage_url), study_name=job.study_name,
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
# The budget and interrupted trials


def uses_budget(trial: FrozenTrial) -> bool:
    """A trial takes a place in the budget once it has a verdict (complete, pruned, failed by its own
    error), while a live worker runs it, and while it waits in the queue (enqueued, run next)."""
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


def this_worker() -> dict[str, Any]:
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid()}


def _boot_id() -> str:
    """Tells a machine's boots apart: after a reboot, every recorded process id is dead."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _worker_is_dead(worker: dict[str, Any], here: dict[str, Any]) -> bool:
    if worker.get("host") != here["host"]:
        return False  # another machine's worker: the RDB heartbeat decides
    if worker.get("boot") != here["boot"]:
        return True
    try:
        os.kill(int(worker["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


def fail_interrupted_trials(study: optuna.Study) -> None:
    """Fail the running trials whose worker process on this machine is gone."""
    here = this_worker()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR)
        if worker and _worker_is_dead(worker, here):
            try:
                study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker failed it first
            print(f"[{study.study_name}] trial {trial.number}: its worker (pid {worker['pid']}) is gone; marked "
                  f"failed, the budget replaces it", flush=True)


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

    def __init__(self, job: SweepJob) -> None:
        self.job = job
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
                            track=job.track)
        except optuna.TrialPruned:
            raise
        except Exception as error:
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
                raise optuna.TrialPruned(f"{key} {row[key]:.2f} at epoch {epoch}")

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
    if trial.params:
        parts.append(describe(trial.params))
    if trial.duration is not None:
        parts.append(f"{trial.duration.total_seconds():.1f} s")
    return " | ".join(parts)


def failure_reason(trial: FrozenTrial) -> str:
    if ERROR_ATTR in trial.user_attrs:
        return str(trial.user_attrs[ERROR_ATTR])
    reason = trial.user_attrs.get(INTERRUPTED_ATTR, "its worker stopped before the trial ended")
    return f"interrupted ({reason}); not counted, the budget replaces it"


# ----------------------------------------------------------------------------------------------
# Workers


def make_sampler(job: SweepJob, worker_index: int, trials_so_far: int) -> optuna.samplers.BaseSampler:
    # One seed for every worker, or for a rerun, would replay the same random start-up points: mix in
    # the worker, the machine and how far the study has got (a single uninterrupted worker stays
    # reproducible).
    entropy = [job.settings.seed, worker_index, trials_so_far, zlib.crc32(socket.gethostname().encode())]
    seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
    # constant_liar: trials still running count as poor results, so parallel workers spread out.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def quiet_optuna() -> None:
    """Our line per trial (with a failed trial's error) replaces Optuna's log lines and tracebacks;
    the traceback stays in the trial's user attributes."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)


def run_worker(job: SweepJob, worker_index: int = 0) -> None:
    """Run trials until the study's budget is used (by this worker and every other one)."""
    quiet_optuna()
    study = optuna.load_study(study_name=job.study_name, storage=open_storage(job.storage_url),
                              pruner=job.settings.make_pruner())
    study.sampler = make_sampler(job, worker_index, len(study.get_trials(deepcopy=False)))
    names = [o.name for o in objectives(job.settings.multi_objective)]
    callbacks = [] if job.quiet else [lambda study, trial: print(f"[{study.study_name}] {trial_line(trial, names)}",
                                                                flush=True)]
    objective = TrialObjective(job)
    while True:
        fail_interrupted_trials(study)
        if budget_started(study) >= job.settings.n_trials:
            return
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=callbacks)


def run_sweep(job: SweepJob) -> tuple[optuna.Study, list[str]]:
    """Create or resume the study and run its missing trials with ``settings.workers`` processes.
    Returns the study and a line per worker process that crashed (empty when all went well)."""
    quiet_optuna()
    preflight(job.config, job.method)
    study = create_or_load_study(job)
    claim_results_dir(job.results_dir, job.study_name, job.storage_url, job.identity)
    fail_interrupted_trials(study)
    used, budget, workers = budget_started(study), job.settings.n_trials, job.settings.workers
    print(f"[{job.study_name}] storage {redact(job.storage_url)}: {min(used, budget)}/{budget} trials done or "
          f"running; {max(budget - used, 0)} to run with {workers} worker(s), {job.settings.epochs_per_trial} epochs "
          f"each, {job.settings.describe_pruning()}", flush=True)
    if used >= budget:
        return study, []
    if workers == 1:
        run_worker(job)
        return study, []
    return study, _run_worker_processes(_share_cpu_threads(job))


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
    manifest = config.dataset.prepared_dir / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"no prepared dataset at {config.dataset.prepared_dir} (no {MANIFEST}); run "
                                f"`python -m reproduce prepare` (or `dvc repro prepare`) first")
    if get_method(method).uses_pretrained_teacher and not config.teacher.weights.is_file():
        raise FileNotFoundError(f"teacher weights not found at {config.teacher.weights}: {method} distils from the "
                                f"trained teacher; run `dvc repro train_teacher` or `python -m reproduce train "
                                f"--method vanilla --network teacher --seed {config.teacher.seed}` first")


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
