"""The report's figures as files under ``reports/figures/`` with their titles and captions: reliability
diagrams, training curves, method signals (drawn by analysis/figures.py) and the sweeps' own Optuna
figures (copied from sweep-results/, never redrawn)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pandas as pd

from analysis.aggregate import Aggregate
from analysis.calibration import MIN_BIN_COUNT, T_MAX, T_MIN, NetworkCalibration, pool_bins
from analysis.figures import (
    curves_figure,
    method_overview_figure,
    reliability_figure,
    reliability_grid,
    save_figure,
    signal_names,
    signals_figure,
)
from analysis.page import FigureEntry
from analysis.registry import display_name
from analysis.runs import EPOCH_LABELS, RunSet
from analysis.sweeps import Sweep
from analysis.tables import temperature_text
from reproduce.config import AnalysisConfig
from reproduce.io import atomic_copy

POOLING = ("bars: the seeds' test predictions pooled; the printed ECE (%): the mean over seeds of each seed's ECE, "
           "as in the tables")
BARS = (f"Bars: accuracy per confidence bin; dashed outlines: bins with fewer than {MIN_BIN_COUNT} predictions "
        f"(too few to read an accuracy from); hatched: the gap to the diagonal; below: predictions per bin (log "
        f"scale, the count above each bar; dotted line: {MIN_BIN_COUNT}), mean confidence (solid) and accuracy "
        f"(dashed).")


def ece_label(values: list[float]) -> str:
    """The ECE printed on a diagram: the mean over seeds of each seed's ECE, in percent."""
    mean = 100 * sum(values) / len(values)
    return f"ECE (%) {mean:.2f}, mean of {len(values)} seed(s)" if len(values) > 1 else f"ECE (%) {mean:.2f}"


def reliability_figures(calibrations: list[NetworkCalibration], aggregate: Aggregate, labels: list[str],
                        settings: AnalysisConfig, directory: Path, best_kind: str) -> list[FigureEntry]:
    grouped: dict[tuple[str, str], list[NetworkCalibration]] = defaultdict(list)
    for calibration in calibrations:
        grouped[calibration.label, calibration.network].append(calibration)
    epoch = EPOCH_LABELS[best_kind]

    def save(figure, stem: str) -> Path:  # noqa: ANN001  (a matplotlib Figure)
        return save_figure(figure, directory, stem, settings.png_dpi, settings.pdf)

    entries = []
    students = [label for label in labels if (label, "student") in grouped]
    for suffix, scaled, description in (("", False, "before"), ("_ts", True, "after")):
        panels = []
        for label in students:
            group = [c for c in grouped[label, "student"] if (c.bins_scaled if scaled else c.bins) is not None]
            if group:
                panels.append((display_name(label, settings),
                               pool_bins([c.bins_scaled if scaled else c.bins for c in group]),
                               ece_label([(c.test_scaled if scaled else c.test)["ece"] for c in group])))
        if not panels:
            continue  # after TS: none without a validation split
        stem = f"reliability_students{suffix}"
        entries.append(FigureEntry(stem, f"Students' reliability, {description} temperature scaling",
                                   f"Test set at the {epoch}, every method's student; {POOLING}. {BARS}",
                                   save(reliability_grid(panels, settings.grid_columns), stem), wide=True))
    for label in labels:
        for network in aggregate.networks(label):
            group = grouped.get((label, network))
            if not group or aggregate.is_frozen_teacher(label, network):
                continue  # a frozen teacher is the teacher row's network: drawn there once
            name = f"{display_name(label, settings)}, {network}"
            stem = f"reliability_{label}_{network}"
            figure = reliability_figure(pool_bins([c.bins for c in group]), name,
                                        ece_label([c.test["ece"] for c in group]))
            scaled = [c for c in group if c.test_scaled is not None]
            if scaled:
                temperature = temperature_text(aggregate.stat(label, network, "temperature"),
                                               aggregate.values(label, network, "temperature_at_bound"), len(group))
                ts = (f"After temperature scaling (T = {temperature}, fitted on validation, bounded to "
                      f"[{T_MIN:g}, {T_MAX:g}]): {ece_label([c.test_scaled['ece'] for c in scaled])}.")
            else:
                ts = "Temperature scaling: not available (no validation split; it is never fitted on test)."
            entries.append(FigureEntry(stem, f"Reliability: {name}",
                                       f"Test set at the {epoch}, {len(group)} seed(s); {POOLING}. {BARS} {ts}",
                                       save(figure, stem), wide=False))
    return entries


def _histories(runset: RunSet, label: str) -> dict[int, pd.DataFrame]:
    return {run.seed: run.history for run in runset.of(label) if run.history is not None}


def curve_figures(runset: RunSet, labels: list[str], settings: AnalysisConfig, directory: Path,
                  frozen_teachers: frozenset[str]) -> list[FigureEntry]:
    entries = []
    histories = {label: _histories(runset, label) for label in labels}
    overview = method_overview_figure({label: seeds for label, seeds in histories.items() if seeds},
                                      {label: display_name(label, settings) for label in labels},
                                      frozen_teachers)
    if overview is not None:
        entries.append(FigureEntry("curves_overview", "Test top-1 per epoch, all methods",
                                   "Mean over seeds, band ± one std. Teacher networks: the teacher method and the "
                                   "online methods' (an offline method's frozen teacher is the teacher method's).",
                                   save_figure(overview, directory, "curves_overview", settings.png_dpi, settings.pdf),
                                   wide=True))
    for label in labels:
        figure = curves_figure(histories[label], display_name(label, settings))
        if figure is not None:
            entries.append(FigureEntry(f"curves_{label}", f"{display_name(label, settings)}: accuracy and loss",
                                       f"{len(histories[label])} seed(s); test solid, validation dashed; "
                                       f"mean ± one std.",
                                       save_figure(figure, directory, f"curves_{label}", settings.png_dpi, settings.pdf),
                                       wide=True))
    return entries


def signal_figures(runset: RunSet, labels: list[str], settings: AnalysisConfig, directory: Path) -> list[FigureEntry]:
    entries = []
    for label in labels:
        histories = _histories(runset, label)
        figure = signals_figure(histories, f"{display_name(label, settings)}: method signals")
        if figure is not None:
            entries.append(FigureEntry(f"signals_{label}", f"{display_name(label, settings)}: method signals",
                                       f"Signals logged (signal/* columns of history.tsv, per-epoch means over "
                                       f"steps): {', '.join(signal_names(histories))}; {len(histories)} seed(s), "
                                       f"mean ± one std.",
                                       save_figure(figure, directory, f"signals_{label}", settings.png_dpi, settings.pdf),
                                       wide=figure.get_figwidth() > 4))
    return entries


def sweep_figures(sweeps: list[Sweep], settings: AnalysisConfig, directory: Path) -> dict[str, list[FigureEntry]]:
    """Each sweep's own PNGs (Optuna's matplotlib plots), copied to reports/figures/sweep_<method>_<name>.png
    so the report folder and the trackers hold them; every caption states the study's budget."""
    directory.mkdir(parents=True, exist_ok=True)
    entries: dict[str, list[FigureEntry]] = {}
    for sweep in sweeps:
        entries[sweep.method] = []
        for source in sweep.shown_figures():
            stem = f"sweep_{sweep.method}_{source.stem}"
            target = directory / f"{stem}.png"
            atomic_copy(source, target)
            entries[sweep.method].append(FigureEntry(
                stem, f"{display_name(sweep.method, settings)}: {source.stem.replace('_', ' ')}",
                f"Drawn by the sweep with Optuna's matplotlib visualisation ({source}). Budget: {sweep.budget}.",
                target, wide=False))
    return entries
