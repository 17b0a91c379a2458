"""The ``sweep:`` section of params.yaml, validated, and the identity (name) of a study."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna

from reproduce.config import Config, ConfigError, build_dataclass
from reproduce.methods import get_method
from sweeps.space import SearchSpace


@dataclass(frozen=True)
class Objective:
    name: str  # column of trials.csv, metric name in the study
    metric: str  # the engine's per-epoch metric of the method's primary network: val/<network>/<metric>
    direction: str


ACCURACY = Objective("val_top1", "top1", "maximize")  # percent
CALIBRATION = Objective("val_ece", "ece", "minimize")  # fraction


def objectives(multi_objective: bool) -> tuple[Objective, ...]:
    return (ACCURACY, CALIBRATION) if multi_objective else (ACCURACY,)


@dataclass
class PrunerSettings:
    name: str = "median"  # median | hyperband | none
    warmup_epochs: int = 1  # every trial trains this many epochs before it can be pruned
    startup_trials: int = 2  # median: trials that must finish unpruned before any pruning


# The engine reports epochs 1, 2, ...; Optuna may prune from step `n_warmup_steps` (median) or
# `min_resource` (hyperband) on, so "warm-up w epochs" means "first pruning check at epoch w + 1".
PRUNERS: dict[str, Callable[[PrunerSettings, int], optuna.pruners.BasePruner]] = {
    "median": lambda pruner, epochs: optuna.pruners.MedianPruner(
        n_startup_trials=pruner.startup_trials, n_warmup_steps=pruner.warmup_epochs + 1),
    "hyperband": lambda pruner, epochs: optuna.pruners.HyperbandPruner(
        min_resource=pruner.warmup_epochs + 1, max_resource=epochs),
    "none": lambda pruner, epochs: optuna.pruners.NopPruner(),
}


@dataclass
class SweepSettings:
    methods: list[str] = field(default_factory=list)  # the `sweep` stage's DVC matrix
    n_trials: int = 4  # budget of the study, shared by all its workers
    epochs_per_trial: int = 3  # replaces recipe.epochs for every trial
    seed: int = 0  # training seed of every trial (trials differ only by their parameters)
    multi_objective: bool = False  # maximise val top-1 and minimise val ECE (Pareto front, no pruning)
    workers: int = 1  # processes on this machine; more machines join with the same --storage
    storage: str = "sqlite:///sweeps/studies/{method}.db"  # RDB URL or journal:PATH; {method} is filled in
    pruner: PrunerSettings = field(default_factory=PrunerSettings)
    spaces: dict[str, Any] = field(default_factory=dict)  # method -> {param: range}; see sweeps/space.py

    def validate(self) -> None:
        for key in ("n_trials", "epochs_per_trial", "workers"):
            if getattr(self, key) < 1:
                raise ConfigError(f"sweep.{key}: must be at least 1 (got {getattr(self, key)})")
        if self.pruner.name not in PRUNERS:
            raise ConfigError(f"sweep.pruner.name: {self.pruner.name!r} is not one of {', '.join(PRUNERS)}")
        for key in ("warmup_epochs", "startup_trials"):
            if getattr(self.pruner, key) < 0:
                raise ConfigError(f"sweep.pruner.{key}: must be >= 0 (got {getattr(self.pruner, key)})")
        journal = self.storage.startswith("journal:") and len(self.storage) > len("journal:")
        if not journal and "://" not in self.storage:
            raise ConfigError(f"sweep.storage: {self.storage!r} is neither a database URL (sqlite:///path.db, "
                              f"postgresql://user@host/db, mysql+pymysql://...) nor journal:path/to/file.log")
        for method in self.methods:
            get_method(method)
            if not self.spaces.get(method):
                raise ConfigError(f"sweep.methods lists {method!r} but sweep.spaces.{method} is empty: a study "
                                  f"needs something to search; add a space or remove {method!r} from sweep.methods")

    def storage_url(self, method: str) -> str:
        return self.storage.replace("{method}", method)

    @property
    def prunes(self) -> bool:
        """Whether a trial can be stopped early: never in a multi-objective study (Optuna cannot prune
        one), and only if the first check (after epoch warmup_epochs + 1) comes before the last epoch;
        after the last epoch the training is done, so no check runs there. Short smoke runs
        (epochs_per_trial 1) therefore simply run without pruning."""
        return (self.pruner.name != "none" and not self.multi_objective
                and self.pruner.warmup_epochs + 1 < self.epochs_per_trial)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        if not self.prunes:
            return optuna.pruners.NopPruner()
        return PRUNERS[self.pruner.name](self.pruner, self.epochs_per_trial)

    def describe_pruning(self) -> str:
        if not self.prunes:
            return "no pruning"
        return f"{self.pruner.name} pruning from epoch {self.pruner.warmup_epochs + 1}"


def load_settings(config: Config) -> SweepSettings:
    settings = build_dataclass(SweepSettings, config.sweep, "sweep")
    settings.validate()
    return settings


# Where the data lives and how it is fetched does not change what a trial measures.
_DATASET_LOCATION_KEYS = ("raw_root", "prepared_root", "download", "verify_md5")


def study_identity(config: Config, method: str, settings: SweepSettings, space: SearchSpace) -> dict[str, Any]:
    """Everything that makes two trials comparable. The trial budget, the pruner and the number of
    workers are left out on purpose: raising the budget or adding workers continues the same study."""
    method_cls = get_method(method)
    resolved = config.to_dict()
    recipe = resolved["recipe"]
    del recipe["epochs"]  # replaced by epochs_per_trial
    fixed = dataclasses.asdict(method_cls.parse_params(config.methods.get(method)))
    return {
        "method": method,
        "space": {name: spec.identity() for name, spec in sorted(space.items())},
        "objectives": [objective.name for objective in objectives(settings.multi_objective)],
        "epochs_per_trial": settings.epochs_per_trial,
        "seed": settings.seed,
        "dataset": {key: value for key, value in resolved["dataset"].items() if key not in _DATASET_LOCATION_KEYS},
        "models": resolved["models"],
        "recipe": recipe,
        "fixed_params": {key: value for key, value in fixed.items() if key not in space},
        "teacher_seed": config.teacher.seed if method_cls.uses_pretrained_teacher else None,
    }


def study_name(identity: dict[str, Any]) -> str:
    """``<method>-<8 hex>``: changing any part of the identity starts a new study."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{identity['method']}-{digest}"
