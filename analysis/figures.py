"""Figures at paper size: reliability diagrams, training curves and method signals (the sweeps draw their
own, with Optuna's matplotlib visualisations; the report embeds those).

Every figure is built on a bare ``matplotlib.figure.Figure`` (no pyplot state to leak between figures),
sized for a single column (3.3 in) or a two-column grid (6.9 in) with fonts of at least 7 pt, and
saved as PNG (for the HTML report and the trackers) and PDF (for a paper).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never open a window, never need a display

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator  # noqa: E402

from analysis.calibration import MIN_BIN_COUNT  # noqa: E402
from reproduce.io import atomic_savefig  # noqa: E402
from reproduce.metrics import ReliabilityBins  # noqa: E402

SINGLE_COLUMN_IN = 3.3
DOUBLE_COLUMN_IN = 6.9
MIN_FONT_PT = 7.0
PAPER_RC = {
    "font.size": 7.5, "axes.titlesize": 8, "axes.labelsize": 7.5, "xtick.labelsize": 7, "ytick.labelsize": 7,
    "legend.fontsize": 7, "legend.title_fontsize": 7, "figure.titlesize": 8.5, "axes.linewidth": 0.6,
    "grid.linewidth": 0.4, "lines.linewidth": 1.0, "hatch.linewidth": 0.5, "legend.frameon": True,
    "legend.framealpha": 0.85,
    # No tight bounding box: constrained layout already fits every figure, and "tight" draws each one twice.
    "pdf.fonttype": 42,  # TrueType in the PDF: text stays editable and searchable
}
ACCURACY_COLOR = "#0173b2"
GAP_COLOR = "#d55e00"

ACCURACY_COLUMN = re.compile(r"^(?P<split>val|test)/(?P<network>[^/]+)/top1$")
LOSS_COLUMN = re.compile(r"^train/(?P<role>[^/]+)/loss$")
SIGNAL_COLUMN = re.compile(r"^signal/(?P<signal>.+)$")


@contextmanager
def paper_style() -> Iterator[None]:
    with plt.rc_context({**sns.axes_style("whitegrid"), **PAPER_RC}):
        yield


def save_figure(figure: Figure, directory: Path, stem: str, dpi: int, pdf: bool = False) -> Path:
    """Write ``stem.png`` (and ``stem.pdf`` for a paper: about half the analysis' time on 2 cores,
    so only when asked); returns the PNG."""
    directory.mkdir(parents=True, exist_ok=True)
    with paper_style():
        atomic_savefig(figure, directory / f"{stem}.png", dpi=dpi)
        if pdf:
            atomic_savefig(figure, directory / f"{stem}.pdf")
    return directory / f"{stem}.png"


# ----------------------------------------------------------------------------------------------
# Reliability diagrams


def draw_reliability(axis: Axes, histogram: Axes, bins: ReliabilityBins, title: str, ece_text: str | None = None,
                     min_count: int = MIN_BIN_COUNT) -> None:
    """Per-bin accuracy against confidence with the gap to the diagonal hatched, and below it the number of
    predictions per bin (log scale, each bin's count written above it) with the mean confidence and the
    accuracy marked. A bin with fewer than ``min_count`` predictions is drawn as a dashed outline without
    hatching: its accuracy rests on a handful of images and must not read as a full bar. ``ece_text``: the
    ECE label (the analysis passes the mean over seeds, its one ECE convention); default: these bins' ECE."""
    edges = bins.edges.numpy()
    left, width = edges[:-1], np.diff(edges)
    counts = bins.counts.numpy()
    supported, sparse = counts >= min_count, (counts > 0) & (counts < min_count)
    accuracy = np.nan_to_num(bins.accuracy.numpy())
    confidence = np.nan_to_num(bins.confidence.numpy())
    axis.bar(left[supported], accuracy[supported], width[supported], align="edge", color=ACCURACY_COLOR,
             alpha=0.85, edgecolor="white", linewidth=0.4, label=f"Accuracy (≥ {min_count} predictions)")
    # An unfilled hatch stays readable over the accuracy bar (under-confident bins) and over white alike.
    axis.bar(left[supported], np.abs(confidence - accuracy)[supported], width[supported],
             bottom=np.minimum(confidence, accuracy)[supported], align="edge", facecolor="none", hatch="////",
             edgecolor=GAP_COLOR, linewidth=0.6, label="Gap to confidence")
    axis.bar(left[sparse], accuracy[sparse], width[sparse], align="edge", facecolor="none", edgecolor="0.45",
             linestyle=(0, (2, 1.5)), linewidth=0.7, label=f"Accuracy (< {min_count} predictions)")
    axis.plot([0, 1], [0, 1], linestyle="--", color="0.3", linewidth=0.8, label="Perfect calibration")
    axis.set(xlim=(0, 1), ylim=(0, 1), ylabel="Accuracy", title=title)
    axis.tick_params(labelbottom=False)
    label = ece_text if ece_text is not None else f"ECE (%) {100 * bins.expected_error():.2f}"
    axis.text(0.04, 0.95, label, transform=axis.transAxes, va="top",
              fontsize=7, bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": "0.7",
                                "linewidth": 0.5})

    filled = counts > 0
    histogram.bar(left[filled], counts[filled], width[filled], align="edge", color=np.where(supported, "0.45", "0.8")[filled],
                  edgecolor="white", linewidth=0.4, label="Predictions per bin")
    histogram.set_yscale("log")
    # The tallest bar takes the lower half of the (log) axis: its count, written upwards, the upper half.
    bottom, tallest = 0.7, max(float(counts.max(initial=1)), min_count)
    histogram.set_ylim(bottom, bottom * (tallest / bottom) ** 2)
    for x, count in zip(left[filled] + width[filled] / 2, counts[filled]):
        histogram.text(x, count * 1.3, f"{int(count)}", rotation=90, ha="center", va="bottom", fontsize=MIN_FONT_PT,
                       color="0.15", bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 0.2})
    histogram.axhline(min_count, color="0.3", linestyle=":", linewidth=0.6)
    total = max(counts.sum(), 1)
    histogram.axvline(float((confidence * counts).sum() / total), color=GAP_COLOR, linewidth=1.0,
                      label="Mean confidence")
    histogram.axvline(float((accuracy * counts).sum() / total), color=ACCURACY_COLOR, linestyle="--",
                      linewidth=1.0, label="Overall accuracy")
    histogram.set(xlim=(0, 1), xlabel="Confidence", ylabel="Predictions")
    histogram.yaxis.set_major_locator(LogLocator(numticks=3))
    histogram.yaxis.set_minor_locator(NullLocator())


def _shared_legend(figure: Figure, axis: Axes, histogram: Axes, columns: int) -> None:
    """One legend above the panels: inside them it would hide bars wherever the network errs."""
    handles, labels = [], []
    for source in (axis, histogram):
        more_handles, more_labels = source.get_legend_handles_labels()
        handles += more_handles
        labels += more_labels
    figure.legend(handles, labels, loc="outside upper center", ncol=columns)


def reliability_figure(bins: ReliabilityBins, title: str, ece_text: str | None = None) -> Figure:
    """One network: single-column size."""
    with paper_style():
        figure = Figure(figsize=(SINGLE_COLUMN_IN, 4.2), layout="constrained")
        axis, histogram = figure.subplots(2, 1, height_ratios=[3, 1.4], sharex=True)
        draw_reliability(axis, histogram, bins, title, ece_text)
        _shared_legend(figure, axis, histogram, columns=2)
    return figure


def reliability_grid(panels: list[tuple[str, ReliabilityBins]] | list[tuple[str, ReliabilityBins, str | None]],
                     columns: int) -> Figure:
    """Several networks side by side: two-column width, the legend once, no title (a paper's caption says it).
    A panel is (title, bins) or (title, bins, ECE label)."""
    columns = min(columns, len(panels))
    rows = -(-len(panels) // columns)
    with paper_style():
        figure = Figure(figsize=(DOUBLE_COLUMN_IN, 2.75 * rows + 0.6), layout="constrained")
        grid = figure.add_gridspec(2 * rows, columns, height_ratios=[3, 1.5] * rows)
        for index, (panel_title, bins, *ece_text) in enumerate(panels):
            row, column = divmod(index, columns)
            axis = figure.add_subplot(grid[2 * row, column])
            histogram = figure.add_subplot(grid[2 * row + 1, column], sharex=axis)
            draw_reliability(axis, histogram, bins, panel_title, ece_text[0] if ece_text else None)
            if index == 0:
                _shared_legend(figure, axis, histogram, columns=3)
    return figure


# ----------------------------------------------------------------------------------------------
# Per-epoch curves and method signals


def long_history(histories: dict[int, pd.DataFrame], pattern: re.Pattern[str], value_name: str) -> pd.DataFrame:
    """The columns of every seed's history that match ``pattern``, stacked: one row per (seed, epoch, column)
    with the pattern's named groups as columns."""
    frames = []
    for seed, history in histories.items():
        for column in history.columns:
            match = pattern.match(column)
            if match:
                frame = history[["epoch", column]].rename(columns={column: value_name}).dropna()
                frames.append(frame.assign(seed=seed, **match.groupdict()))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def curves_figure(histories: dict[int, pd.DataFrame], title: str) -> Figure | None:
    """Accuracy (validation dashed, test solid) and training loss per epoch of every network of one
    method; the line is the mean over seeds, the band ± one std."""
    accuracy = long_history(histories, ACCURACY_COLUMN, "top-1 (%)")
    loss = long_history(histories, LOSS_COLUMN, "loss")
    if accuracy.empty and loss.empty:
        return None
    with paper_style():
        figure = Figure(figsize=(DOUBLE_COLUMN_IN, 2.5), layout="constrained")
        figure.suptitle(title)
        left, right = figure.subplots(1, 2)
        if not accuracy.empty:
            sns.lineplot(accuracy, x="epoch", y="top-1 (%)", hue="network", style="split", style_order=["test", "val"],
                         errorbar="sd", ax=left, palette="colorblind")
            left.set_title("Top-1 accuracy")
            left.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not loss.empty:
            sns.lineplot(loss, x="epoch", y="loss", hue="role", errorbar="sd", ax=right, palette="colorblind")
            right.set_title("Training loss")
            right.xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure


def method_overview_figure(histories: dict[str, dict[int, pd.DataFrame]], names: dict[str, str],
                           frozen_teacher: frozenset[str] = frozenset()) -> Figure | None:
    """Test top-1 per epoch of every method's student and teacher networks; a method keeps its colour
    across the panels and appears only where it has such a network. ``frozen_teacher``: labels whose
    teacher network is the pre-trained teacher (a flat line, the teacher method's): left out of the teacher panel."""
    frames = []
    for label, seeds in histories.items():
        frame = long_history(seeds, ACCURACY_COLUMN, "test top-1 (%)")
        if not frame.empty:
            frame = frame[frame["split"] == "test"]
            if label in frozen_teacher:
                frame = frame[frame["network"] != "teacher"]
            frames.append(frame.assign(method=names[label]))
    data = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    networks = [network for network in ("student", "teacher") if not data.empty and network in set(data["network"])]
    if not networks:
        return None
    methods = [names[label] for label in histories]
    colours = dict(zip(methods, sns.color_palette("colorblind", len(methods))))
    with paper_style():
        figure = Figure(figsize=(DOUBLE_COLUMN_IN, 2.5), layout="constrained")
        axes = figure.subplots(1, len(networks), squeeze=False)[0]
        for axis, network in zip(axes, networks):
            subset = data[data["network"] == network]
            present = [method for method in methods if method in set(subset["method"])]
            sns.lineplot(subset, x="epoch", y="test top-1 (%)", hue="method", hue_order=present, palette=colours,
                         errorbar="sd", ax=axis)
            axis.set_title(f"{network.capitalize()} networks")
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure


def signal_names(histories: dict[int, pd.DataFrame]) -> list[str]:
    return sorted({match["signal"] for history in histories.values() for column in history.columns
                   if (match := SIGNAL_COLUMN.match(column))})


def signals_figure(histories: dict[int, pd.DataFrame], title: str) -> Figure | None:
    """Every ``signal/*`` column the method logged (discovered, not listed per method), per epoch."""
    signals = long_history(histories, SIGNAL_COLUMN, "value")
    if signals.empty:
        return None
    names = signal_names(histories)
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    with paper_style():
        figure = Figure(figsize=(DOUBLE_COLUMN_IN if columns > 1 else SINGLE_COLUMN_IN, 2.0 * rows + 0.3),
                        layout="constrained")
        figure.suptitle(title)
        axes = figure.subplots(rows, columns, squeeze=False).flatten()
        for axis, name in zip(axes, names):
            sns.lineplot(signals[signals["signal"] == name], x="epoch", y="value", errorbar="sd", ax=axis,
                         color=ACCURACY_COLOR)
            axis.set(title=name, ylabel=name)
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        for axis in axes[len(names):]:
            axis.set_visible(False)
    return figure
