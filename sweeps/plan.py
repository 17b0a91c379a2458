"""What a study is before it runs: its job (settings, space, name), its pruner, its budget in words,
and the configuration of one trial.

A trial is the method's run in miniature: ``recipe.epochs`` becomes ``sweep.epochs_per_trial``, and
every setting counted in epochs shrinks (or grows) with it, so that the trial keeps the run's
schedule. That is the method's ``*_epochs`` coefficients (DKD's and AEKT's ``warmup_epochs``: the
distillation term reaches full weight at the same fraction of the trial as of the run, never after
the trial's last epoch) and the recipe's learning-rate milestones and warm-up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from reproduce.config import Config, config_from_dict
from reproduce.methods import MethodKind, get_method
from reproduce.config import SweepConfig
from reproduce.config.stages import raw_space
from sweeps.settings import objectives, storage_url
from sweeps.space import SearchSpace, parse_space

RESULTS_ROOT = Path("sweep-results")  # sweep-results/<method>/: the results of the study it shows
# Fewer complete trials than this make a smoke test, not a study: no parameter importance is shown
# (fANOVA fits a random forest to the complete trials; with fewer points than this, and 2 to 9
# parameters, its splits follow noise), and best_params.yaml does not offer itself for training.
# Optuna's TPE sampler draws its first 10 trials at random for the same reason: below that, a
# model of the history is not worth trusting.
MIN_COMPLETE_TRIALS = 10
# Where the rules that turn a config into trials change, studies made under the old rules stop
# being continued (this is part of every study's name).
TRIAL_RULES = 2  # 2: epoch-counted settings scale to the trial; pruning from past half the trial
EPOCH_COUNT_SUFFIX = "_epochs"  # a method coefficient named so is a number of epochs


@dataclass(frozen=True)
class SweepJob:
    """Everything a worker needs; picklable, because workers are spawned processes."""

    config: Config  # the base configuration; each trial overrides methods.<method>.<param>
    method: str
    settings: SweepConfig
    space: SearchSpace
    study_name: str
    identity: dict[str, Any]
    track: bool = True  # the study a W&B and MLflow run, every trial a run nested under it
    quiet: bool = False  # no line per finished trial

    @property
    def storage_url(self) -> str:
        return storage_url(self.settings, self.method)

    @property
    def results_dir(self) -> Path:
        return RESULTS_ROOT / self.method


def plan_job(config: Config, method: str, *, track: bool = True, quiet: bool = False) -> SweepJob | None:
    """Validate the settings and the method's space; None when the space is empty (nothing to tune)."""
    settings = config.sweep
    method_cls = get_method(method)
    where = (f"sweep.spaces.{method}" if method in settings.spaces
             else f"{method_cls.__module__}.{method_cls.__qualname__}.search_space")
    space = parse_space(raw_space(settings, method), method, config.methods.get(method), where)
    if not space:
        return None
    identity = study_identity(config, method, settings, space)
    return SweepJob(config, method, settings, space, study_name(identity), identity, track, quiet)


# Where the data lives and how it is fetched does not change what a trial measures.
_DATASET_LOCATION_KEYS = ("raw_root", "prepared_root", "download", "verify_md5")


def study_identity(config: Config, method: str, settings: SweepConfig, space: SearchSpace) -> dict[str, Any]:
    """Everything that makes two trials comparable. The trial budget, the pruner and the number of
    workers are left out on purpose: raising the budget or adding workers continues the same study."""
    method_cls = get_method(method)
    resolved = config.to_dict()
    recipe = resolved["recipe"]
    del recipe["epochs"]  # replaced by epochs_per_trial
    fixed = dataclasses.asdict(method_cls.parse_params(config.methods.get(method)))
    offline = method_cls.kind is MethodKind.OFFLINE
    return {
        "method": method,
        "trial_rules": TRIAL_RULES,
        "space": {name: spec.identity() for name, spec in sorted(space.items())},
        "objectives": [objective.name for objective in objectives(settings.multi_objective)],
        "epochs_per_trial": settings.epochs_per_trial,
        "run_epochs": config.recipe.epochs,  # the schedule a trial is scaled from
        "seed": settings.seed,
        "dataset": {key: value for key, value in resolved["dataset"].items() if key not in _DATASET_LOCATION_KEYS},
        "models": resolved["models"],
        "recipe": recipe,
        "fixed_params": {key: value for key, value in fixed.items() if key not in space},
        "teacher": {"seed": config.teacher.seed, "checkpoint": config.teacher.checkpoint} if offline else None,
    }


def study_name(identity: dict[str, Any]) -> str:
    """``<method>-<8 hex>``: changing any part of the identity starts a new study."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{identity['method']}-{digest}"


# ----------------------------------------------------------------------------------------------
# Pruning


def first_prune_epoch(settings: SweepConfig) -> int | None:
    """The first epoch after which a trial may be pruned, or None when none can be. A trial trains
    ``pruner.warmup_epochs`` epochs and more than half of its epochs first: the learning rate decays
    over the trial, and before its middle a trial's validation score mostly says how noisy its
    high-learning-rate phase was. After the last epoch the training is done, so there is no check
    there: a 2-epoch trial is never pruned. Optuna cannot prune a multi-objective study."""
    if settings.pruner.name == "none" or settings.multi_objective:
        return None
    first = max(settings.pruner.warmup_epochs + 1, settings.epochs_per_trial // 2 + 1)
    return first if first < settings.epochs_per_trial else None


def make_pruner(settings: SweepConfig) -> optuna.pruners.BasePruner:
    # The engine reports epochs 1, 2, ...; the median pruner may prune from step n_warmup_steps on,
    # Hyperband from step min_resource on.
    first = first_prune_epoch(settings)
    if first is None:
        return optuna.pruners.NopPruner()
    if settings.pruner.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=settings.epochs_per_trial)
    return optuna.pruners.MedianPruner(n_startup_trials=settings.pruner.startup_trials, n_warmup_steps=first)


def describe_pruning(settings: SweepConfig) -> str:
    first = first_prune_epoch(settings)
    return "no pruning" if first is None else f"{settings.pruner.name} pruning from epoch {first}"


# ----------------------------------------------------------------------------------------------
# The budget, in words and as data: wherever a result of the study appears


def is_smoke(complete_trials: int) -> bool:
    return complete_trials < MIN_COMPLETE_TRIALS


def budget(config: Config, method: str, settings: SweepConfig) -> dict[str, Any]:
    """The study's budget as summary.json and the tracked study run record it."""
    return {
        "text": describe_budget(config, method, settings),
        "n_trials": settings.n_trials,
        "epochs_per_trial": settings.epochs_per_trial,
        "run_epochs": config.recipe.epochs,
        "pruner": settings.pruner.name if first_prune_epoch(settings) is not None else "none",
        "warmup_epochs": settings.pruner.warmup_epochs,
        "first_prune_epoch": first_prune_epoch(settings),
        "sampler": SAMPLER,
        "seed": settings.seed,
        "workers": settings.workers,
        "scaled_to_trial": scaled_settings(config, method, settings.epochs_per_trial),
        "min_complete_trials": MIN_COMPLETE_TRIALS,
    }


SAMPLER = "TPE (constant liar; random draws seeded by sweep.seed and the trial number)"


def describe_budget(config: Config, method: str, settings: SweepConfig) -> str:
    """``3 trials x 2 of the run's 8 epochs, no pruning, dkd warmup_epochs 3 -> 1``."""
    text = (f"{settings.n_trials} trials x {settings.epochs_per_trial} of the run's {config.recipe.epochs} epochs, "
            f"{describe_pruning(settings)}")
    scaled = scaled_settings(config, method, settings.epochs_per_trial)
    if scaled:
        text += "; scaled to the trial: " + ", ".join(f"{key} {change['run']} -> {change['trial']}"
                                                      for key, change in scaled.items())
    return text


# ----------------------------------------------------------------------------------------------
# One trial's configuration


def scale_epochs(epochs: float, trial_epochs: int, run_epochs: int) -> int:
    """An epoch count of the run as the same fraction of the trial: at least 1, at most the trial."""
    return min(trial_epochs, max(1, round(epochs * trial_epochs / run_epochs)))


def scaled_settings(config: Config, method: str, trial_epochs: int,
                    params: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The epoch-counted settings a trial of ``trial_epochs`` changes: ``{key: {run, trial}}``. A
    method's ``*_epochs`` coefficient also never exceeds the trial, even as long as the run: a warm-up
    longer than the training would keep the distillation term below full weight to the end.
    ``params``: the trial's searched values (a searched ``*_epochs`` coefficient is scaled too)."""
    run_epochs = config.recipe.epochs
    method_cls = get_method(method)
    coefficients = dataclasses.asdict(method_cls.parse_params({**config.methods.get(method, {}), **(params or {})}))
    changes: dict[str, dict[str, Any]] = {}
    for name, value in coefficients.items():
        if name.endswith(EPOCH_COUNT_SUFFIX) and isinstance(value, int) and not isinstance(value, bool):
            changes[f"methods.{method}.{name}"] = {"run": value, "trial": scale_epochs(value, trial_epochs, run_epochs)}
    schedule = config.recipe.schedule
    if trial_epochs == run_epochs:  # a milestone past the last epoch does nothing: nothing else to scale
        return {key: change for key, change in changes.items() if change["run"] != change["trial"]}
    if schedule.name == "step" and schedule.milestones:
        changes["recipe.schedule.milestones"] = {
            "run": list(schedule.milestones),
            "trial": [scale_epochs(m, trial_epochs, run_epochs) for m in schedule.milestones]}
    if schedule.warmup_epochs:
        changes["recipe.schedule.warmup_epochs"] = {
            "run": schedule.warmup_epochs, "trial": schedule.warmup_epochs * trial_epochs / run_epochs}
    return {key: change for key, change in changes.items() if change["run"] != change["trial"]}


def trial_config(job: SweepJob, params: dict[str, Any]) -> Config:
    """The run of one trial: the base configuration, the trial's parameters, ``epochs_per_trial``
    epochs, and the epoch-counted settings scaled to that length."""
    raw = job.config.to_dict()
    raw["methods"][job.method] = {**(raw["methods"].get(job.method) or {}), **params}
    for key, change in scaled_settings(job.config, job.method, job.settings.epochs_per_trial, params).items():
        *parents, leaf = key.split(".")
        section = raw
        for part in parents:
            section = section[part]
        section[leaf] = change["trial"]
    raw["recipe"]["epochs"] = job.settings.epochs_per_trial
    raw["runtime"]["quiet"] = True  # parallel workers' epoch bars would interleave; one line per trial instead
    raw["tracking"]["group"] = job.study_name  # a study's trials side by side in W&B and MLflow
    return config_from_dict(raw)

