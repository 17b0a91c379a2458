"""Run metadata: the runs table (one row per run directory, time and environment from metrics.json) and
how a training commit is named."""

from __future__ import annotations

from typing import Any

import pandas as pd

from analysis.registry import display_name
from analysis.runs import RunSet
from analysis.tables import Cell, Table
from reproduce.config import AnalysisConfig


def runs_table(runset: RunSet, labels: list[str], settings: AnalysisConfig) -> Table:
    columns = ["Method", "Seed", "Epochs", "Selection", "Best epoch", "Networks", "Train s", "Images/s", "Device",
               "torch", "Python", "Commit"]
    rows, numeric = [], []
    for label in labels:
        for run in runset.of(label):
            metrics = run.metrics
            time = metrics.get("time", {})
            environment = metrics.get("environment", {})
            values = {"label": label, "seed": run.seed, "epochs": metrics.get("epochs"), "selection": run.selection,
                      "best_epoch": metrics[run.best_kind]["epoch"], "networks": " ".join(run.networks),
                      "train_s": time.get("train_s"), "images_per_s": time.get("images_per_s"),
                      "device": environment.get("device"), "torch": environment.get("torch"),
                      "python": environment.get("python"), "commit": describe_commit(environment)}
            numeric.append(values)
            rows.append([Cell(display_name(label, settings)), *(Cell(_text(values[key])) for key in list(values)[1:])])
    return Table("runs", "Runs", "One row per run directory analysed; time and environment from metrics.json. "
                 "Selection: how the best epoch was chosen (val: on validation top-1; test: on test top-1, the "
                 "paper protocol).", columns, rows, pd.DataFrame(numeric), align="lrrlrlrrllll")


def _text(value: Any) -> str:
    if value is None:
        return "missing"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def describe_commit(environment: dict[str, Any]) -> str:
    commit = str(environment.get("commit", "unknown"))
    short = commit[:12] if commit != "unknown" else commit
    return f"{short} (uncommitted changes)" if environment.get("dirty") else short


def seeds_text(runset: RunSet, labels: list[str]) -> str:
    return "; ".join(f"{label}: {', '.join(str(run.seed) for run in runset.of(label))}" for label in labels)


def training_commits(runset: RunSet) -> list[str]:
    return sorted({describe_commit(run.metrics.get("environment", {})) for run in runset.runs})
