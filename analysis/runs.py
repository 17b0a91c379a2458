"""Reading the training runs: ``runs/<label>/seed<k>/{metrics.json, history.tsv, predictions.pt}``.

``label`` is a method name, or ``teacher`` for the vanilla teacher. A run whose files are missing or
malformed is left out (or, for the optional files, analysed without them) with a note that the report
shows: bad input never stops the analysis silently and never becomes a number.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

EPOCH_KINDS = ("best", "last")


class AnalysisError(Exception):
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
    def networks(self) -> list[str]:
        return list(self.metrics["networks"])

    @property
    def predictions_path(self) -> Path:
        return self.path / "predictions.pt"

    def test_metrics(self, epoch_kind: str, network: str) -> dict[str, float]:
        """Test-split numbers of ``network`` at the best (chosen on validation) or last epoch."""
        return self.metrics[epoch_kind]["test"].get(network, {})


@dataclass
class RunSet:
    runs: list[Run]
    setup: Setup
    notes: list[str] = field(default_factory=list)

    @property
    def labels(self) -> set[str]:
        return {run.label for run in self.runs}

    def of(self, label: str) -> list[Run]:
        return sorted((run for run in self.runs if run.label == label), key=lambda run: run.seed)


def load_runs(root: Path) -> RunSet:
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
    return _keep_one_setup(runs, notes)


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
    missing = [key for key in ("method", "seed", "dataset", "teacher", "student", "networks", *EPOCH_KINDS)
               if key not in metrics]
    if missing:
        return f"lacks {', '.join(missing)}"
    for kind in EPOCH_KINDS:
        if not isinstance(metrics[kind], dict) or "test" not in metrics[kind] or "epoch" not in metrics[kind]:
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


def _keep_one_setup(runs: list[Run], notes: list[str]) -> RunSet:
    """Tables average over seeds, so every run must share one dataset and one pair; the most common
    setup wins and the others are left out, by name."""
    counts = Counter(run.setup for run in runs)
    setup = counts.most_common(1)[0][0]
    for run in runs:
        if run.setup != setup:
            notes.append(f"{run.path}: trained on {run.setup.describe()}, the other runs on {setup.describe()}: "
                         f"left out (numbers from different setups are never averaged)")
    return RunSet([run for run in runs if run.setup == setup], setup, notes)
