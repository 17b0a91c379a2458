"""The ``sweep:`` section of params.yaml, validated, and the identity (name) of a study."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna

from reproduce.config import Config, ConfigError, build_dataclass
from reproduce.methods import get_method
from reproduce.methods.base import registered
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
class HeartbeatSettings:
    """Optuna's heartbeat (RDB storages only): how a trial of a worker on another machine that died
    (pre-empted node, lost network) is found. A worker on this machine is found at once by its process id."""

    interval_s: int = 60  # each running trial writes its heartbeat this often
    grace_s: int = 180  # a running trial whose heartbeat is older than this belongs to a dead worker


@dataclass
class SweepSettings:
    # The methods `--method all` runs; None: every registered method with a non-empty search space.
    methods: list[str] | None = None
    n_trials: int = 4  # budget of the study, shared by all its workers
    epochs_per_trial: int = 3  # replaces recipe.epochs for every trial
    seed: int = 0  # training seed of every trial (trials differ only by their parameters)
    multi_objective: bool = False  # maximise val top-1 and minimise val ECE (Pareto front, no pruning)
    workers: int = 1  # processes on this machine; more machines join with the same --storage
    storage: str = "sqlite:///sweeps/studies/{method}.db"  # RDB URL or journal:PATH; {method} is filled in
    pruner: PrunerSettings = field(default_factory=PrunerSettings)
    heartbeat: HeartbeatSettings = field(default_factory=HeartbeatSettings)
    # method -> {param: range} (sweeps/space.py's format), replacing that method's own `search_space`.
    spaces: dict[str, Any] = field(default_factory=dict)

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
        if self.heartbeat.interval_s < 1 or self.heartbeat.grace_s <= self.heartbeat.interval_s:
            raise ConfigError(f"sweep.heartbeat: need interval_s >= 1 and grace_s > interval_s (got interval_s "
                              f"{self.heartbeat.interval_s}, grace_s {self.heartbeat.grace_s}); a grace of a few "
                              f"intervals keeps a busy worker from being taken for a dead one")
        for method in self.spaces:
            get_method(method)  # an override for a method that does not exist is a typo
        for method in self.methods or []:
            get_method(method)
            if not self.raw_space(method):
                raise ConfigError(f"sweep.methods lists {method!r} but its search space is empty (the method "
                                  f"declares none, or sweep.spaces.{method} is empty): a study needs something to "
                                  f"search; add a space under sweep.spaces.{method} or remove {method!r} from "
                                  f"sweep.methods")

    def raw_space(self, method: str) -> Any:
        """The space to search: ``sweep.spaces.<method>`` when given (it replaces the method's own),
        else the method's ``search_space``."""
        if method in self.spaces:
            return self.spaces[method]
        return copy.deepcopy(getattr(get_method(method), "search_space", {}))

    def swept_methods(self) -> list[str]:
        """``sweep.methods``, or every registered method (in table order) with a non-empty space."""
        if self.methods is not None:
            return list(self.methods)
        return [cls.name for cls in registered() if self.raw_space(cls.name)]

    def select_methods(self, selector: str) -> list[str]:
        """``--method``: one name, a comma list (run in that order), or ``all`` (``swept_methods``)."""
        if selector.strip() == "all":
            methods = self.swept_methods()
            if not methods:
                raise ConfigError("--method all: no method has a search space (sweep.methods is empty, or no "
                                  "registered method declares a search_space and sweep.spaces adds none)")
            return methods
        methods = [name.strip() for name in selector.split(",") if name.strip()]
        if not methods:
            raise ConfigError(f"--method {selector!r}: name a method, a comma list (kd,dkd) or all")
        for method in methods:
            get_method(method)
        return list(dict.fromkeys(methods))

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
        "teacher_seed": config.teacher.seed if method_cls.kind.value == "offline" else None,
    }


def study_name(identity: dict[str, Any]) -> str:
    """``<method>-<8 hex>``: changing any part of the identity starts a new study."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{identity['method']}-{digest}"
