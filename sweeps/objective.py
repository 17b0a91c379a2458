"""One trial: its sampled parameters, its run through the engine, its score, and its line in the log."""

from __future__ import annotations

import contextlib
import shutil
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from reproduce.methods import get_method
from reproduce.tracking import Tracker
from reproduce.train import EpochCallback, RunSpec, train
from sweeps.budget import (EPOCHS_ATTR, ERROR_ATTR, INTERRUPTED_ATTR, TRACEBACK_ATTR, WORKER_ATTR, budget_used,
                           failure_reason, retried_from, this_worker)
from sweeps.plan import SweepJob, first_prune_epoch, trial_config
from sweeps.settings import objectives
from sweeps.space import describe

CHECKPOINTS_ROOT = Path("checkpoints/sweeps")  # rolling checkpoints, deleted when each trial ends
# Per-run files the engine writes that a sweep does not keep: nobody reloads the weights of many short
# trials (train the best parameters instead). metrics.json and history.tsv stay.
BULKY_RUN_FILES = ("final.pt", "best.pt", "predictions.pt", "code.tar.gz")


class BudgetSpent(RuntimeError):
    """Another worker took the last trials of the budget at the same moment as this one."""


class TrialPruned(optuna.TrialPruned):
    """Optuna's pruning signal, which the engine's trackers record as a pruned run (not a failed one)."""

    tracking_status = "pruned"


def trial_run_dir(job: SweepJob, number: int) -> Path:
    """``sweep-results/<method>/trials/<study>/<number>``: each study's trials in a folder of their own,
    so a new study never touches the folders of the one the results still show."""
    return job.results_dir / "trials" / job.study_name / str(number)


class TrialObjective:
    """Train one trial through the engine; its score is the primary network's last-epoch validation
    top-1 (and ECE): the trial's schedule is built to end there, and the test split is never used.
    ``worker``: what the worker records about itself (device, threads) next to its process id."""

    def __init__(self, job: SweepJob, parent: Tracker | None = None, worker: dict[str, Any] | None = None) -> None:
        self.job = job
        self.parent = parent
        self.worker = worker or {}
        self.primary = get_method(job.method).primary
        self.objectives = objectives(job.settings.multi_objective)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        job = self.job
        if budget_used(trial.study, below_number=trial.number) >= job.settings.n_trials:
            trial.set_user_attr(INTERRUPTED_ATTR, "surplus: other workers used the last of the budget")
            raise BudgetSpent(f"the budget of {job.settings.n_trials} trials was used by other workers")
        trial.set_user_attr(WORKER_ATTR, this_worker(**self.worker))
        params = {name: spec.suggest(trial, name) for name, spec in job.space.items()}
        spec = RunSpec(job.method, job.settings.seed, trial_run_dir(job, trial.number),
                       CHECKPOINTS_ROOT / job.study_name / str(trial.number))
        try:
            summary = train(trial_config(job, params), spec, resume="never", on_epoch_end=self._reporter(trial),
                            track=job.track, parent=self.parent)
        except optuna.TrialPruned:
            raise
        except Exception as error:  # a diverged loss (DivergedError) lands here, with its message
            trial.set_user_attr(ERROR_ATTR, f"{type(error).__name__}: {error}")
            trial.set_user_attr(TRACEBACK_ATTR, traceback.format_exc())  # where, for optuna-dashboard
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
        # Reported (for the intermediate-values plot) whenever Optuna can prune this study; checked
        # only from the first epoch the pruner may act on: the pruner itself enforces that too.
        reports = not self.job.settings.multi_objective  # Optuna cannot prune multi-objective studies
        first_check = first_prune_epoch(self.job.settings)

        def report(epoch: int, row: dict[str, float]) -> None:
            trial.set_user_attr(EPOCHS_ATTR, epoch)
            if not reports or key not in row:  # not evaluated this epoch (recipe.eval_every)
                return
            trial.report(row[key], epoch)
            if first_check is not None and first_check <= epoch < self.job.settings.epochs_per_trial \
                    and trial.should_prune():
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
    if retried_from(trial) is not None:
        parts[0] += f" (retry of trial {retried_from(trial)})"
    if trial.params:
        parts.append(describe(trial.params))
    if trial.duration is not None:
        parts.append(f"{trial.duration.total_seconds():.1f} s")
    return " | ".join(parts)


class TrialSeededTPESampler(optuna.samplers.BaseSampler):
    """TPE whose random draws for a trial are seeded by (``sweep.seed``, trial number): a fresh
    ``TPESampler`` per trial, built in ``before_trial`` with that seed (Optuna has no public way to
    reseed a sampler with a chosen seed). Workers that start together (processes, machines, reruns) then
    never replay one another's draws, as they would with one seed each, and a study run by one worker
    is reproducible, as it would not be with a seed per process. TPE keeps no state between trials
    besides its random generator: it reads the history from the study every time. Its constant liar
    (Optuna's default) counts trials still running as poor results, so parallel workers spread out."""

    def __init__(self, study_seed: int) -> None:
        self.study_seed = study_seed
        self._tpe = self._sampler(-1)

    def _sampler(self, number: int) -> optuna.samplers.TPESampler:
        seed = int(np.random.SeedSequence([self.study_seed, number + 1]).generate_state(1)[0])
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._tpe = self._sampler(trial.number)
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: optuna.distributions.BaseDistribution) -> Any:
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: list[float] | None) -> None:
        self._tpe.after_trial(study, trial, state, values)
