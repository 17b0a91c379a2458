"""Search spaces as data: a method's ``search_space`` (or its replacement, params.yaml
``sweep.spaces.<method>``) → one Optuna distribution per parameter.

A space is checked against the method before any trial runs: every name must be a field of the
method's ``Params``, every range well formed, and both ends of a range (every choice of a categorical)
must be values the method itself accepts (``parse_params``), so a space that would crash trial 17 of 20
fails in the first second instead. ``methods.<method>``, which every trial starts from, is checked when the
config loads, so an error here is the range's own.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any

import optuna

from reproduce.config import ConfigError, build_dataclass
from reproduce.methods import get_method

PARAM_TYPES = ("float", "int", "categorical")
CategoricalChoice = None | bool | int | float | str  # what Optuna can store


@dataclass
class ParamSpec:
    """One searched coefficient: ``{type: float, low: 1, high: 8, log: true}`` or
    ``{type: categorical, choices: [entropy_ratio, hard]}``."""

    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None  # grid spacing; float and int only, not with log
    log: bool = False  # sample uniformly in log space (low must be > 0)
    choices: list[Any] | None = None

    def check(self, where: str) -> None:
        if self.type not in PARAM_TYPES:
            raise ConfigError(f"{where}.type: {self.type!r} is not one of {', '.join(PARAM_TYPES)}")
        if self.type == "categorical":
            self._check_categorical(where)
        else:
            self._check_range(where)

    def _check_categorical(self, where: str) -> None:
        if self.low is not None or self.high is not None or self.step is not None or self.log:
            raise ConfigError(f"{where}: a categorical takes only `choices`; drop low/high/step/log")
        if not isinstance(self.choices, list) or not self.choices:
            raise ConfigError(f"{where}.choices: give a non-empty list, e.g. choices: [a, b]")
        for choice in self.choices:
            if not isinstance(choice, CategoricalChoice):
                raise ConfigError(f"{where}.choices: {choice!r} is not a number, string, boolean or null")

    def _check_range(self, where: str) -> None:
        if self.choices is not None:
            raise ConfigError(f"{where}: `choices` belongs to type: categorical; a {self.type} takes low/high")
        if self.low is None or self.high is None:
            raise ConfigError(f"{where}: a {self.type} needs both `low` and `high`, e.g. {{type: {self.type}, low: 1, "
                              f"high: 8}}")
        if not self.low < self.high:
            raise ConfigError(f"{where}: low ({self.low}) must be smaller than high ({self.high})")
        if self.log and self.low <= 0:
            raise ConfigError(f"{where}: log: true needs low > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ConfigError(f"{where}: use either log: true or step, not both (Optuna samples one or the other)")
        if self.step is not None and self.step <= 0:
            raise ConfigError(f"{where}.step: must be > 0 (got {self.step})")
        if self.type == "int":
            for key in ("low", "high", "step"):
                value = getattr(self, key)
                if value is not None and not float(value).is_integer():
                    raise ConfigError(f"{where}.{key}: a type: int range needs whole numbers (got {value})")

    def candidates(self) -> list[Any]:
        """The values whose acceptance by the method stands for the whole space: the ends of a range
        (methods bound their coefficients by intervals) or every categorical choice."""
        if self.type == "categorical":
            return list(self.choices or [])
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(name, self.choices)
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)

    def identity(self) -> dict[str, Any]:
        """What makes two specs the same search space (part of the study name's hash)."""
        # Unset options are left out so that adding an option here later keeps existing study names.
        return {key: value for key, value in dataclasses.asdict(self).items()
                if value is not None and value is not False}


SearchSpace = dict[str, ParamSpec]


def parse_space(raw: Any, method: str, fixed_params: dict[str, Any] | None, where: str | None = None) -> SearchSpace:
    """Validate a space against the method; ``fixed_params`` are the method's other coefficients
    (``methods.<method>`` in params.yaml), held at their configured values. ``where`` names the space
    in errors (default ``sweep.spaces.<method>``)."""
    where = where or f"sweep.spaces.{method}"
    method_cls = get_method(method)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of parameter name to range, e.g. "
                          f"{{temperature: {{type: float, low: 1, high: 8}}}}; got {raw!r}")
    fields = [field.name for field in dataclasses.fields(method_cls.Params)]
    space: SearchSpace = {}
    for name, spec_raw in raw.items():
        at = f"{where}.{name}"
        if name not in fields:
            close = difflib.get_close_matches(str(name), fields, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{at}: {method} has no parameter {name!r}; {hint}its parameters are "
                              f"{', '.join(fields) or '(none)'}")
        spec = build_dataclass(ParamSpec, spec_raw, at)
        spec.check(at)
        for value in spec.candidates():
            try:
                method_cls.parse_params({**(fixed_params or {}), name: value})
            except ConfigError as error:
                raise ConfigError(f"{at}: {method} rejects {name}={value!r} ({error}); narrow the range or drop "
                                  f"that choice") from None
        space[name] = spec
    return space


def describe(params: dict[str, Any]) -> str:
    """``temperature=3.21 weighting=hard``: short, aligned enough for a progress line."""
    return " ".join(f"{name}={_short(value)}" for name, value in params.items())


def _short(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)
