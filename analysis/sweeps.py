"""Reading the Optuna sweeps' outputs as sweeps/report.py writes them, ``sweeps/results/<method>/``:
``trials.csv`` (number, state, one column per objective, params_*), ``best_params.yaml`` and
``importance.json`` ({"importances": {objective: {param: importance}}, "notes": {objective: why none}}).

Every file is optional; what is missing or unreadable becomes a note, never a number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sweeps.settings import objectives

# The objectives a study can have and their directions, from the sweeps' own definition.
DIRECTIONS = {objective.name: objective.direction for objective in objectives(multi_objective=True)}


@dataclass
class Sweep:
    method: str
    path: Path
    trials: pd.DataFrame | None = None
    best_params: str | None = None  # best_params.yaml as written: its header names the trial and its scores
    importance: dict[str, dict[str, float]] = field(default_factory=dict)  # objective -> parameter -> importance
    notes: list[str] = field(default_factory=list)

    @property
    def objectives(self) -> list[str]:
        return [name for name in DIRECTIONS if self.trials is not None and name in self.trials.columns]

    def trials_in(self, state: str) -> pd.DataFrame:
        if self.trials is None:
            return pd.DataFrame()
        return self.trials[self.trials["state"] == state].sort_values("number")


def load_sweeps(root: Path) -> list[Sweep]:
    """One Sweep per method folder; an absent or empty ``root`` means no sweep was run."""
    if not root.is_dir():
        return []
    return [_load_sweep(path) for path in sorted(root.iterdir()) if path.is_dir() and not (path / NOT_SWEPT).exists()]


# What a pipeline stage leaves in sweeps/results/<method>/ of a method with no search space (DVC
# needs the stage's declared output to exist): not a sweep.
NOT_SWEPT = "not_swept.txt"


def _load_sweep(path: Path) -> Sweep:
    sweep = Sweep(path.name, path)
    _read_trials(sweep, path / "trials.csv")
    best = path / "best_params.yaml"
    if best.exists():
        sweep.best_params = best.read_text()
    else:
        sweep.notes.append(f"{best} missing: no complete trial, or the sweep has not finished")
    _read_importance(sweep, path / "importance.json")
    return sweep


def _read_trials(sweep: Sweep, path: Path) -> None:
    if not path.exists():
        sweep.notes.append(f"{path} missing: no trial history")
        return
    try:
        trials = pd.read_csv(path)
    except (OSError, ValueError) as error:
        sweep.notes.append(f"{path} is unreadable ({error})")
        return
    if not {"number", "state"} <= set(trials.columns) or not any(name in trials.columns for name in DIRECTIONS):
        sweep.notes.append(f"{path} lacks the number/state columns or an objective column "
                           f"({', '.join(DIRECTIONS)}): the trial history is not plotted")
        return
    sweep.trials = trials


def _read_importance(sweep: Sweep, path: Path) -> None:
    if not path.exists():
        sweep.notes.append(f"{path} missing: no parameter importance")
        return
    try:
        raw = json.loads(path.read_text())
        sweep.importance = {str(objective): {str(name): float(value) for name, value in values.items()}
                            for objective, values in raw["importances"].items()}
        sweep.notes += [f"no importance for {objective}: {why}" for objective, why in raw.get("notes", {}).items()]
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as error:
        sweep.notes.append(f"{path} is unreadable ({type(error).__name__}: {error})")


def running_best(values: pd.Series, direction: str) -> pd.Series:
    return values.cummax() if direction == "maximize" else values.cummin()
