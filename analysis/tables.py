"""Tables: one model (header, rows of cells, bold flags) rendered as Markdown, LaTeX (booktabs) and HTML,
plus the numeric CSV beside each. Builders for the method comparison and the calibration table."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

import pandas as pd

from analysis.aggregate import Aggregate, Stat
from analysis.settings import AnalysisSettings

WRAP_AFTER_CHARACTERS = 40  # HTML cells longer than this (notes, citations) may wrap; numbers never do
NOT_APPLICABLE = "—"  # the row has no such network (a vanilla student has no teacher)
MISSING = "missing"  # the network exists but this number could not be computed (see the notes)

LATEX_REPLACEMENTS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                      "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                      "±": r"$\pm$", "→": r"$\rightarrow$", "Δ": r"$\Delta$", "—": "---", "−": "$-$",
                      "×": r"$\times$", "≥": r"$\geq$"}


@dataclass(frozen=True)
class Cell:
    text: str
    bold: bool = False


@dataclass
class Table:
    name: str  # file stem under reports/tables/
    title: str
    caption: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    numeric: pd.DataFrame | None = None  # the CSV: machine-readable numbers behind the cells
    align: str = ""  # one letter per column, l or r; default: text first column, numbers after

    def alignment(self) -> str:
        return self.align or "l" + "r" * (len(self.columns) - 1)

    def to_markdown(self) -> str:
        def line(cells: list[str]) -> str:
            return "| " + " | ".join(cell.replace("|", r"\|") for cell in cells) + " |"

        lines = [f"### {self.title}", "", self.caption, "", line(self.columns),
                 line(["---:" if side == "r" else "---" for side in self.alignment()])]
        lines += [line([f"**{c.text}**" if c.bold else c.text for c in row]) for row in self.rows]
        return "\n".join(lines) + "\n"

    def to_latex(self) -> str:
        def line(cells: list[str]) -> str:
            return " & ".join(cells) + r" \\"

        body = [line([rf"\textbf{{{latex_escape(c.text)}}}" if c.bold else latex_escape(c.text) for c in row])
                for row in self.rows]
        return "\n".join([
            "% Requires \\usepackage{booktabs}.",
            r"\begin{table}[t]", r"\centering", r"\small",
            rf"\caption{{{latex_escape(self.title)}. {latex_escape(self.caption)}}}",
            rf"\label{{tab:{self.name.replace('_', '-')}}}",
            rf"\begin{{tabular}}{{{self.alignment()}}}", r"\toprule",
            line([latex_escape(column) for column in self.columns]), r"\midrule", *body,
            r"\bottomrule", r"\end{tabular}", r"\end{table}"]) + "\n"

    def to_html(self) -> str:
        sides = self.alignment()
        head = "".join(f'<th class="{side}">{html.escape(column)}</th>' for side, column in zip(sides, self.columns))

        def cell(c: Cell, side: str) -> str:
            classes = side + (" wrap" if len(c.text) > WRAP_AFTER_CHARACTERS else "")
            text = f"<strong>{html.escape(c.text)}</strong>" if c.bold else html.escape(c.text)
            return f'<td class="{classes}">{text}</td>'

        body = "".join("<tr>" + "".join(cell(c, side) for c, side in zip(row, sides)) + "</tr>" for row in self.rows)
        return (f"<table><caption>{html.escape(self.caption)}</caption><thead><tr>{head}</tr></thead>"
                f"<tbody>{body}</tbody></table>")


def latex_escape(text: str) -> str:
    return "".join(LATEX_REPLACEMENTS.get(char, char) for char in text)


def format_stat(stat: Stat | None, digits: int, scale: float = 1.0, row_seeds: int | None = None) -> str:
    """``mean ± std``; one seed shows the mean alone; a count different from the row's seed count is shown."""
    if stat is None:
        return MISSING
    text = f"{stat.mean * scale:.{digits}f}"
    if not math.isnan(stat.std):
        text += f" ± {stat.std * scale:.{digits}f}"
    if row_seeds is not None and stat.n != row_seeds:
        text += f" (n={stat.n})"
    return text


# ----------------------------------------------------------------------------------------------
# The method comparison


@dataclass(frozen=True, kw_only=True)
class Measure:
    header: str
    quantity: str  # record column (analysis/aggregate.py)
    scale: float = 1.0  # 100 shows a fraction as a percentage
    digits: int = 2

    @property
    def key(self) -> str:
        return self.quantity + ("_pct" if self.scale == 100 else "")


@dataclass(frozen=True, kw_only=True)
class Column(Measure):
    network: str
    better: str  # "max" or "min": which value is bold

    @property
    def key(self) -> str:
        return f"{self.network}_{super().key}"


COMPARISON_COLUMNS = [
    Column(header="Teacher top-1 best", network="teacher", quantity="top1_best", better="max"),
    Column(header="Teacher top-1 last", network="teacher", quantity="top1_last", better="max"),
    Column(header="Student top-1 best", network="student", quantity="top1_best", better="max"),
    Column(header="Student top-1 last", network="student", quantity="top1_last", better="max"),
    Column(header="Student ECE %", network="student", quantity="ece_best", better="min", scale=100),
    Column(header="Student ECE % after TS", network="student", quantity="ece_ts", better="min", scale=100),
    Column(header="Student NLL", network="student", quantity="nll_best", better="min", digits=3),
    Column(header="Student Brier", network="student", quantity="brier_best", better="min", digits=3),
]

COMPARISON_CAPTION = (
    "Test set, mean ± sample std (n − 1) over seeds. Best = the epoch chosen on validation top-1 (as each "
    "run's metrics.json records it), reported on test; last = the final epoch. ECE, NLL and Brier at the best "
    "epoch; ECE with {n_bins} equal-width bins (lo, hi]. TS: temperature scaling fitted on the validation logits "
    "(never test) and applied to test. Bold: best per column (highest accuracy, lowest ECE/NLL/Brier). "
    "— : the run has no such network.")


def comparison_table(aggregate: Aggregate, labels: list[str], settings: AnalysisSettings) -> Table:
    seeds = {label: len(aggregate.seeds(label)) for label in labels}
    stats = {(label, column): aggregate.stat(label, column.network, column.quantity)
             if column.network in aggregate.networks(label) else None
             for label in labels for column in COMPARISON_COLUMNS}
    best = {column: _best_labels(column, {label: stats[label, column] for label in labels})
            for column in COMPARISON_COLUMNS}

    rows, numeric = [], []
    for label in labels:
        cells = [Cell(settings.display_name(label))]
        values: dict[str, object] = {"label": label, "method": settings.display_name(label), "seeds": seeds[label]}
        for column in COMPARISON_COLUMNS:
            stat = stats[label, column]
            applicable = column.network in aggregate.networks(label)
            text = format_stat(stat, column.digits, column.scale, seeds[label]) if applicable else NOT_APPLICABLE
            cells.append(Cell(text, bold=label in best[column]))
            values.update({f"{column.key}_mean": stat.mean * column.scale if stat else None,
                           f"{column.key}_std": _scaled_std(stat, column.scale),
                           f"{column.key}_n": stat.n if stat else 0,
                           f"{column.key}_is_best": label in best[column]})
        cells.append(Cell(str(seeds[label])))
        rows.append(cells)
        numeric.append(values)
    return Table("comparison", "Methods compared", COMPARISON_CAPTION.format(n_bins=settings.n_bins),
                 ["Method", *(column.header for column in COMPARISON_COLUMNS), "Seeds"], rows, pd.DataFrame(numeric))


def _best_labels(column: Column, stats: dict[str, Stat | None]) -> set[str]:
    """Rows holding the best mean as displayed (ties at the shown precision are all bold)."""
    shown = {label: round(stat.mean * column.scale, column.digits) for label, stat in stats.items() if stat}
    if not shown:
        return set()
    target = max(shown.values()) if column.better == "max" else min(shown.values())
    return {label for label, value in shown.items() if value == target}


def _scaled_std(stat: Stat | None, scale: float) -> float | None:
    return None if stat is None or math.isnan(stat.std) else stat.std * scale


# ----------------------------------------------------------------------------------------------
# Calibration of every network, before and after temperature scaling

CALIBRATION_MEASURES = [
    Measure(header="Top-1 best", quantity="top1_best"),
    Measure(header="T", quantity="temperature"),
    Measure(header="ECE %", quantity="ece_best", scale=100),
    Measure(header="ECE % TS", quantity="ece_ts", scale=100),
    Measure(header="aECE %", quantity="adaptive_ece_best", scale=100),
    Measure(header="aECE % TS", quantity="adaptive_ece_ts", scale=100),
    Measure(header="MCE %", quantity="mce_best", scale=100),
    Measure(header="MCE % TS", quantity="mce_ts", scale=100),
    Measure(header="NLL", quantity="nll_best", digits=3),
    Measure(header="NLL TS", quantity="nll_ts", digits=3),
    Measure(header="Brier", quantity="brier_best", digits=3),
    Measure(header="Brier TS", quantity="brier_ts", digits=3),
]

CALIBRATION_CAPTION = (
    "Every evaluated network, test set at the best epoch, mean ± sample std over seeds. ECE/MCE: {n_bins} "
    "equal-width bins (lo, hi] on the top-label confidence; aECE: {n_bins} equal-mass bins. T: the temperature "
    "fitted on the validation logits of the same epoch (T > 1 softens an over-confident network); "
    "TS columns: the test numbers after dividing the logits by T. Accuracy is unchanged by TS.")


def calibration_table(aggregate: Aggregate, labels: list[str], settings: AnalysisSettings) -> Table:
    rows, numeric = [], []
    for label in labels:
        seeds = len(aggregate.seeds(label))
        for network in aggregate.networks(label):
            cells = [Cell(settings.display_name(label)), Cell(network)]
            values: dict[str, object] = {"label": label, "method": settings.display_name(label),
                                         "network": network, "seeds": seeds}
            for measure in CALIBRATION_MEASURES:
                stat = aggregate.stat(label, network, measure.quantity)
                cells.append(Cell(format_stat(stat, measure.digits, measure.scale, seeds)))
                values.update({f"{measure.key}_mean": stat.mean * measure.scale if stat else None,
                               f"{measure.key}_std": _scaled_std(stat, measure.scale),
                               f"{measure.key}_n": stat.n if stat else 0})
            cells.append(Cell(str(seeds)))
            rows.append(cells)
            numeric.append(values)
    return Table("calibration", "Calibration before and after temperature scaling",
                 CALIBRATION_CAPTION.format(n_bins=settings.n_bins),
                 ["Method", "Network", *(measure.header for measure in CALIBRATION_MEASURES), "Seeds"], rows,
                 pd.DataFrame(numeric), align="ll" + "r" * (len(CALIBRATION_MEASURES) + 1))
