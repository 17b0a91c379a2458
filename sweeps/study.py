"""Running a study: check what would fail every trial, create or resume the study, run its missing
trials with the workers, write the results. ``run_study`` is the entry point of the CLI and of the
pipeline's per-method stages."""

from __future__ import annotations

import warnings
from typing import Any

import optuna

from reproduce.config import Config, ConfigError
from reproduce.errors import UserError
from reproduce.methods import MethodKind, get_method
from sweeps.budget import budget_started, fail_interrupted_trials, study_storage
from sweeps.plan import RESULTS_ROOT, SweepJob, describe_budget, plan_job
from sweeps.report import write_results
from sweeps.settings import objectives
from sweeps.storage import redact, storage_errors
from sweeps.tracked import close_study_run, open_study_run
from reproduce.launch.devices import WorkerSlot, parse_devices, worker_slots
from sweeps.workers import run_worker, run_worker_processes

# The entry points of the layers above (pipeline/): the study of one method and where its results go.
__all__ = ["RESULTS_ROOT", "MissingInputError", "create_or_load_study", "run_study", "run_sweep"]


class MissingInputError(UserError):
    """What every trial needs (the prepared data, the teacher's weights) is not there."""


def create_or_load_study(job: SweepJob) -> optuna.Study:
    with storage_errors(job.storage_url):
        study = optuna.create_study(storage=study_storage(job.storage_url, job.settings.heartbeat),
                                    study_name=job.study_name,
                                    directions=[o.direction for o in objectives(job.settings.multi_objective)],
                                    load_if_exists=True)
        if "identity" not in study.user_attrs:  # shown by optuna-dashboard: what the hash in the name stands for
            study.set_user_attr("identity", job.identity)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([o.name for o in objectives(job.settings.multi_objective)])
    return study


def run_sweep(job: SweepJob, devices: list[str] | None = None) -> optuna.Study:
    """Create or resume the study and run its missing trials with ``settings.workers`` processes (on
    ``devices``, see sweeps/workers.py); returns once the budget is complete (what a worker process
    that died left is finished in this one). The study's tracked run stays open for ``write_results``."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    preflight(job.config, job.method)
    study = create_or_load_study(job)
    parent = open_study_run(job.config, job.method, job.study_name, job.storage_url, job.identity, enabled=job.track)
    try:
        with storage_errors(job.storage_url):
            fail_interrupted_trials(study)
            used, budget, workers = budget_started(study), job.settings.n_trials, job.settings.workers
        print(f"[{job.study_name}] storage {redact(job.storage_url)}: {min(used, budget)}/{budget} trials done or "
              f"running; {max(budget - used, 0)} to run with {workers} worker(s){_on(devices)}; budget "
              f"{describe_budget(job.config, job.method, job.settings)}", flush=True)
        slots = worker_slots(workers, devices, job.config.runtime.threads)
        if workers == 1:
            run_worker(job, slots[0], parent=parent, own_process=False)  # also waits for other machines' trials
            return study
        crashed = run_worker_processes(job, slots)
        if crashed:
            # The trials of the workers that died are queued again; finish them here, with every core.
            for line in crashed:
                print(f"[{job.study_name}] {line}; finishing the study in this process", flush=True)
            run_worker(job, WorkerSlot(0, slots[0].device), parent=parent, own_process=False)
        return study
    except BaseException:
        close_study_run(parent)  # suspended: a rerun continues the study and its run
        raise


def run_study(config: Config, method: str, *, track: bool = True, quiet: bool = False,
              devices: str | None = None) -> dict[str, Any] | None:
    """Run one method's study and write its results; returns the summary (``summary["best"]`` is None
    when no trial completed; ``summary["results_dir"]``: where the files went), or None when the
    method has nothing to tune. ``devices``: ``--devices`` (None: every worker on runtime.device)."""
    job = plan_job(config, method, track=track, quiet=quiet)
    if job is None:
        return None
    study = run_sweep(job, parse_devices(devices))
    with storage_errors(job.storage_url):
        return write_results(study, job.method, job.config, storage_url=job.storage_url, track=job.track)


def _on(devices: list[str] | None) -> str:
    return "" if devices is None else f" on {'cpu' if devices == ['cpu'] else 'GPU ' + ','.join(devices)}"


def preflight(config: Config, method: str) -> None:
    """Fail before the first trial on what would fail every trial."""
    from reproduce.data.prepare import load_prepared  # its errors name the prepare command

    if config.dataset.val_fraction == 0:
        raise ConfigError(f"{method}: a sweep scores every trial on the validation split, and dataset.val_fraction "
                          f"is 0 (no validation split; the papers' protocol, which picks epochs on test). Set "
                          f"dataset.val_fraction > 0 (e.g. --set dataset.val_fraction=0.15, then `python -m "
                          f"reproduce prepare` again) to sweep; tuning on the test split would make every "
                          f"reported number optimistic")
    if len(load_prepared(config.dataset.prepared_dir).val.labels) == 0:
        raise ConfigError(f"{method}: a sweep scores every trial on the validation split, and the prepared dataset "
                          f"at {config.dataset.prepared_dir} has none (it was prepared with val_fraction 0); run "
                          f"`python -m reproduce prepare` again with dataset.val_fraction > 0")
    teacher = config.teacher.weights
    if get_method(method).kind is MethodKind.OFFLINE and config.teacher.checkpoint is None and not teacher.is_file():
        raise MissingInputError(f"teacher weights not found at {teacher}: {method} distils from the trained teacher; "
                                f"train it first (`dvc repro` or the pipeline's teacher stage)")
