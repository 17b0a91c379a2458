"""The curated per-epoch curves for ``dvc plots``: wide TSVs under ``reports/plots/``.

One file per curve: the column ``epoch``, then one column per run label (the method names of the
registry, in table order), one row per epoch. A cell is the MEAN OVER SEEDS of that run label's
history.tsv column at that epoch (the seeds that reached it); an epoch a method did not train is empty.
ECE is in percent, as everywhere in the report. The teacher curve holds the networks that train (the
``teacher`` method and the online methods), not the frozen pre-trained teacher of the offline methods,
which would be a flat copy of the teacher method's last epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.runs import RunSet
from reproduce.io import atomic_write_text


@dataclass(frozen=True)
class Curve:
    stem: str  # reports/plots/<stem>.tsv
    column: str  # history.tsv column
    scale: float
    title: str
    skip_frozen_teacher: bool = False


CURVES = (
    Curve("student_test_top1", "test/student/top1", 1.0, "Student test top-1 (%)"),
    Curve("student_test_ece", "test/student/ece", 100.0, "Student test ECE (%)"),
    Curve("student_train_loss", "train/student/loss", 1.0, "Student training loss (sum of its terms)"),
    Curve("teacher_test_top1", "test/teacher/top1", 1.0, "Teacher test top-1 (%)", skip_frozen_teacher=True),
)


def curve_table(runset: RunSet, labels: list[str], curve: Curve, frozen_teachers: frozenset[str]) -> pd.DataFrame:
    """``frozen_teachers``: labels whose teacher network is the teacher method's (left out of teacher curves)."""
    series: dict[str, pd.Series] = {}
    for label in labels:
        if curve.skip_frozen_teacher and label in frozen_teachers:
            continue
        frames = [run.history[["epoch", curve.column]] for run in runset.of(label)
                  if run.history is not None and curve.column in run.history.columns]
        if not frames:
            continue
        stacked = pd.concat(frames, ignore_index=True).dropna()
        if stacked.empty:
            continue
        series[label] = stacked.groupby("epoch")[curve.column].mean() * curve.scale
    if not series:
        return pd.DataFrame(columns=["epoch"])
    table = pd.DataFrame(series).sort_index()
    table.index = table.index.astype(int)
    return table.rename_axis("epoch").reset_index()


def write_curves(runset: RunSet, labels: list[str], directory: Path, frozen_teachers: frozenset[str]) -> dict[str, Path]:
    """Every curve's TSV (a header alone when no run logged it, so the plot definition always finds its
    file); returns stem -> path."""
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for curve in CURVES:
        path = directory / f"{curve.stem}.tsv"
        atomic_write_text(path, curve_table(runset, labels, curve, frozen_teachers).to_csv(
            sep="\t", index=False, float_format="%.6g", lineterminator="\n"))
        written[curve.stem] = path
    return written
