"""What the ``sweep:`` section of params.yaml (``config.sweep``, typed and checked at load by
reproduce/config/stages.py) selects: which methods are swept, over which spaces (``raw_space``), into
which storage; and a study's objectives."""

from __future__ import annotations

from dataclasses import dataclass

from reproduce.config import ConfigError, SweepConfig
from reproduce.config.stages import raw_space
from reproduce.methods import get_method
from reproduce.methods.base import registered


@dataclass(frozen=True)
class Objective:
    name: str  # column of trials.csv, metric name in the study
    metric: str  # the engine's per-epoch metric of the method's primary network: val/<network>/<metric>
    direction: str


ACCURACY = Objective("val_top1", "top1", "maximize")  # percent
CALIBRATION = Objective("val_ece", "ece", "minimize")  # fraction


def objectives(multi_objective: bool) -> tuple[Objective, ...]:
    return (ACCURACY, CALIBRATION) if multi_objective else (ACCURACY,)


def swept_methods(settings: SweepConfig) -> list[str]:
    """``sweep.methods``, or every registered method (in table order) with a non-empty space."""
    if settings.methods is not None:
        return list(settings.methods)
    return [cls.name for cls in registered() if raw_space(settings, cls.name)]


def select_methods(settings: SweepConfig, selector: str) -> list[str]:
    """``--method``: one name, a comma list (run in that order), or ``all`` (``swept_methods``)."""
    if selector.strip() == "all":
        methods = swept_methods(settings)
        if not methods:
            raise ConfigError("--method all: no method has a search space (sweep.methods is empty, or no registered "
                              "method declares a search_space and sweep.spaces adds none)")
        return methods
    methods = [name.strip() for name in selector.split(",") if name.strip()]
    if not methods:
        raise ConfigError(f"--method {selector!r}: name a method, a comma list (kd,dkd) or all")
    for method in methods:
        get_method(method)
    return list(dict.fromkeys(methods))


def storage_url(settings: SweepConfig, method: str) -> str:
    return settings.storage.replace("{method}", method)
