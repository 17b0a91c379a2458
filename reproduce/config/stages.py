"""The sections of the stages after training: ``sweep`` (Optuna studies, python -m sweeps) and
``analysis`` (tables, figures and the report, python -m analysis). Their fields are typed and checked
here, at load, like every other section; what the stages compute from them (Optuna's pruner, the
registry's display names) stays in their packages."""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from reproduce.config.base import ConfigError, Flag, Integer, Section, at_least


class PrunerConfig(Section):
    section = "sweep.pruner"
    name: Literal["median", "hyperband", "none"] = "median"
    # A trial trains at least this many epochs, and at least half of its epochs, before it can be pruned
    # (sweeps/plan.py, first_prune_epoch).
    warmup_epochs: Annotated[Integer, at_least(0)] = 1
    startup_trials: Annotated[Integer, at_least(0)] = 2  # median: trials that must finish unpruned before any pruning


class HeartbeatConfig(Section):
    """Optuna's heartbeat (RDB storages only): how a trial of a worker on another machine that died
    (pre-empted node, lost network) is found. A worker on this machine is found at once by its process id."""

    section = "sweep.heartbeat"
    interval_s: Integer = 60  # each running trial writes its heartbeat this often
    grace_s: Integer = 180  # a running trial whose heartbeat is older than this belongs to a dead worker

    @model_validator(mode="after")
    def _grace_after_interval(self) -> HeartbeatConfig:
        if self.interval_s < 1 or self.grace_s <= self.interval_s:
            raise ConfigError(f"sweep.heartbeat: need interval_s >= 1 and grace_s > interval_s (got interval_s "
                              f"{self.interval_s}, grace_s {self.grace_s}); a grace of a few intervals keeps a busy "
                              f"worker from being taken for a dead one")
        return self


class SweepConfig(Section):
    section = "sweep"
    # The methods `--method all` runs; None: every registered method with a non-empty search space.
    methods: list[str] | None = None
    n_trials: Annotated[Integer, at_least(1)] = 4  # budget of the study, shared by all its workers
    epochs_per_trial: Annotated[Integer, at_least(1)] = 3  # replaces recipe.epochs for every trial
    seed: Integer = 0  # training seed of every trial (trials differ only by their parameters)
    multi_objective: Flag = False  # maximise val top-1 and minimise val ECE (Pareto front, no pruning)
    # Processes on this machine; more machines join with the same --storage.
    workers: Annotated[Integer, at_least(1)] = 1
    storage: str = "sqlite:///studies/{method}.db"  # RDB URL or journal:PATH; {method} is filled in
    pruner: PrunerConfig = Field(default_factory=PrunerConfig)
    heartbeat: HeartbeatConfig = Field(default_factory=HeartbeatConfig)
    # method -> {param: range} (sweeps/space.py's format), replacing that method's own `search_space`.
    spaces: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _storage_and_methods(self) -> SweepConfig:
        journal = self.storage.startswith("journal:") and len(self.storage) > len("journal:")
        if not journal and "://" not in self.storage:
            raise ConfigError(f"sweep.storage: {self.storage!r} is neither a database URL (sqlite:///path.db, "
                              f"postgresql://user@host/db, mysql+pymysql://...) nor journal:path/to/file.log")
        for method in self.spaces:
            _method(method, "sweep.spaces")  # an override for a method that does not exist is a typo
        for method in self.methods or []:
            _method(method, "sweep.methods")
            if not raw_space(self, method):
                raise ConfigError(f"sweep.methods lists {method!r} but its search space is empty (the method "
                                  f"declares none, or sweep.spaces.{method} is empty): a study needs something to "
                                  f"search; add a space under sweep.spaces.{method} or remove {method!r} from "
                                  f"sweep.methods")
        return self


def raw_space(settings: SweepConfig, method: str) -> Any:
    """The space to search: ``sweep.spaces.<method>`` when given (it replaces the method's own), else
    the method's ``search_space``."""
    if method in settings.spaces:
        return settings.spaces[method]
    return copy.deepcopy(getattr(_method(method), "search_space", {}))


def _method(name: str, where: str | None = None) -> type:
    from reproduce.methods.base import get_method  # the registry imports torch: only when a name is checked

    return get_method(name, where)


class AnalysisConfig(Section):
    section = "analysis"
    n_bins: Annotated[Integer, at_least(1)] = 15  # equal-width calibration bins (and the reliability diagrams' bars)
    # Overrides of the registry: run labels listed here come first, in this order; the rest follow by the
    # registry's row_order, then by label.
    order: list[str] = Field(default_factory=list)
    names: dict[str, str] = Field(default_factory=dict)  # label -> display name, over the registry's
    # Relative paths are read from the directory that holds params.yaml (the project root).
    published_results: str = "analysis/published_results.yaml"
    # Where the papers' main tables live: listed for reference when no published number matches our runs.
    reference_dataset: str = "cifar100"
    png_dpi: Annotated[Integer, at_least(50)] = 200
    pdf: Flag = False  # also write every figure as PDF (vector, for a paper)
    grid_columns: Annotated[Integer, at_least(1)] = 3  # reliability diagrams per row in the all-methods grid

    @model_validator(mode="after")
    def _order_once(self) -> AnalysisConfig:
        if len(set(self.order)) != len(self.order):
            raise ConfigError(f"analysis.order: lists a label twice: {self.order}")
        return self
