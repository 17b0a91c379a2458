"""Reading the training runs: ``runs/<label>/seed<k>/{metrics.json, history.tsv, predictions.pt}``.

``label`` is a registered method name (``teacher`` is the vanilla-teacher method). A run whose files are
missing or malformed is left out (or, for the optional files, analysed without them) with a note that the
report shows: bad input never stops the analysis silently and never becomes a number.

Epoch kinds. A run's ``selection`` says how its best epoch was chosen, and metrics.json names the best
epoch after it, so the two can never be read as one another:
  ``best``                the best epoch, selected on validation top-1 (``selection: "val"``; a metrics.json
                          without ``selection`` is of this kind, written before the paper protocol existed);
  ``best_test_selected``  the best epoch, selected on TEST top-1: the papers' protocol, no validation split
                          (``selection: "test"``, dataset.val_fraction = 0);
  ``last``                the final epoch (every run).
The two selections also train on different data (a validation split is held out of the training set or
not), so one analysis holds runs of one selection only: the other runs are left out, by name.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from reproduce.errors import UserError

EPOCH_KINDS = ("best", "best_test_selected", "last")
BEST_KIND = {"val": "best", "test": "best_test_selected"}  # selection -> metrics.json key of its best epoch
EPOCH_LABELS = {"best": "best epoch, selected on validation",
                "best_test_selected": "best epoch, selected on test (paper protocol)",
                "last": "last epoch"}
EPOCH_SHORT = {"best": "best (val-selected)", "best_test_selected": "best (test-selected)", "last": "last"}
PROTOCOLS = {"val": "validation split held out of the training set; best epoch selected on validation top-1",
             "test": "paper protocol: no validation split (dataset.val_fraction = 0); best epoch selected on "
                     "test top-1"}


class AnalysisError(UserError):
    """Input that makes the whole analysis impossible; the message says what to do."""


@dataclass(frozen=True)
class Setup:
    """What makes numbers comparable: the dataset and the teacher -> student pair."""

    dataset: str
    teacher: str
    student: str

    @property
    def pair(self) -> str:
        return f"{self.teacher}→{self.student}"

    def describe(self) -> str:
        return f"{self.dataset}, {self.pair}"


@dataclass
class Run:
    label: str
    seed: int
    path: Path
    metrics: dict[str, Any]
    history: pd.DataFrame | None

    @property
    def setup(self) -> Setup:
        return Setup(self.metrics["dataset"], self.metrics["teacher"], self.metrics["student"])

    @property
    def selection(self) -> str:
        return str(self.metrics.get("selection", "val"))

    @property
    def best_kind(self) -> str:
        return BEST_KIND[self.selection]

    @property
    def epoch_kinds(self) -> tuple[str, str]:
        return self.best_kind, "last"

    @property
    def networks(self) -> list[str]:
        return list(self.metrics["networks"])

    @property
    def predictions_path(self) -> Path:
        return self.path / "predictions.pt"

    def test_metrics(self, epoch_kind: str, network: str) -> dict[str, float]:
        """Test-split numbers of ``network`` at an epoch kind of this run (``epoch_kinds``)."""
        return self.metrics[epoch_kind]["test"].get(network, {})


@dataclass
class RunSet:
    runs: list[Run]
    setup: Setup
    selection: str  # every run's: "val" or "test"
    notes: list[str] = field(default_factory=list)

    @property
    def best_kind(self) -> str:
        return BEST_KIND[self.selection]

    @property
    def has_validation(self) -> bool:
        return self.selection == "val"

    @property
    def labels(self) -> set[str]:
        return {run.label for run in self.runs}

    def of(self, label: str) -> list[Run]:
        return sorted((run for run in self.runs if run.label == label), key=lambda run: run.seed)


def load_runs(root: Path, preferred_selection: str = "val") -> RunSet:
    """Every finished run under ``root`` of the most common setup and selection (``preferred_selection``,
    the one params.yaml configures, wins a tie)."""
    if not root.is_dir():
        raise AnalysisError(f"runs directory {root} not found: train first (`dvc repro`), or pass --runs PATH")
    runs: list[Run] = []
    notes: list[str] = []
    for run_dir in sorted(path for path in root.glob("*/seed*") if path.is_dir()):
        run = _load_run(run_dir, notes)
        if run is not None:
            runs.append(run)
    if not runs:
        raise AnalysisError(f"no finished run under {root}: expected {root}/<method>/seed<k>/metrics.json "
                            f"(written at the end of `python -m reproduce train`)")
    return _keep_one_setup(runs, notes, preferred_selection)


def _load_run(run_dir: Path, notes: list[str]) -> Run | None:
    where = str(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.exists():
        notes.append(f"{where}: no metrics.json (unfinished or failed run): left out")
        return None
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        notes.append(f"{where}: metrics.json is unreadable ({error}): left out")
        return None
    problem = _metrics_problem(metrics)
    if problem:
        notes.append(f"{where}: metrics.json {problem}: left out")
        return None
    if run_dir.name != f"seed{metrics['seed']}":
        notes.append(f"{where}: metrics.json says seed {metrics['seed']}, the directory says otherwise: left out")
        return None
    if not (run_dir / "predictions.pt").exists():
        notes.append(f"{where}: no predictions.pt: no temperature scaling or reliability diagram for this run")
    return Run(run_dir.parent.name, int(metrics["seed"]), run_dir, metrics, _load_history(run_dir, notes))


def _metrics_problem(metrics: Any) -> str | None:
    if not isinstance(metrics, dict):
        return "is not a JSON object"
    selection = metrics.get("selection", "val")
    if selection not in BEST_KIND:
        return f"has selection {selection!r} (expected \"val\" or \"test\")"
    kinds = (BEST_KIND[selection], "last")
    missing = [key for key in ("method", "seed", "dataset", "teacher", "student", "networks", *kinds)
               if key not in metrics]
    if missing:
        return f"lacks {', '.join(missing)} (selection {selection!r})"
    other = next(kind for value, kind in BEST_KIND.items() if value != selection)
    if other in metrics:
        # A best epoch under the other selection's name could be read as the wrong kind of number.
        return f"has selection {selection!r} but also a {other!r} entry (contradictory)"
    for kind in kinds:
        if not isinstance(metrics[kind], dict) or not isinstance(metrics[kind].get("test"), dict) \
                or "epoch" not in metrics[kind]:
            return f"has no {kind}.epoch / {kind}.test"
    return None


def _load_history(run_dir: Path, notes: list[str]) -> pd.DataFrame | None:
    path = run_dir / "history.tsv"
    if not path.exists():
        notes.append(f"{run_dir}: no history.tsv: no per-epoch curves for this run")
        return None
    try:
        history = pd.read_csv(path, sep="\t")
    except (OSError, ValueError) as error:
        notes.append(f"{run_dir}: history.tsv is unreadable ({error}): no per-epoch curves for this run")
        return None
    if "epoch" not in history.columns:
        notes.append(f"{run_dir}: history.tsv has no epoch column: no per-epoch curves for this run")
        return None
    return history


def _keep_one_setup(runs: list[Run], notes: list[str], preferred_selection: str) -> RunSet:
    """Tables average over seeds and compare methods, so every run must share one dataset, one pair and
    one selection (the selections differ in the training data and in the meaning of "best"); the most
    common setup, then the most common selection, wins and the others are left out, by name."""
    counts = Counter(run.setup for run in runs)
    setup = counts.most_common(1)[0][0]
    for run in runs:
        if run.setup != setup:
            notes.append(f"{run.path}: trained on {run.setup.describe()}, the other runs on {setup.describe()}: "
                         f"left out (numbers from different setups are never averaged)")
    kept = [run for run in runs if run.setup == setup]
    selections = Counter(run.selection for run in kept)
    selection = max(selections, key=lambda value: (selections[value], value == preferred_selection))
    for run in kept:
        if run.selection != selection:
            notes.append(f"{run.path}: selection {run.selection!r} ({PROTOCOLS[run.selection]}), the other runs "
                         f"{selection!r}: left out (a different training set and a different best epoch; rerun "
                         f"it with the other runs' dataset.val_fraction)")
    return RunSet([run for run in kept if run.selection == selection], setup, selection, notes)
