"""Tables: one model (header, rows of cells, bold flags) rendered as Markdown and LaTeX (booktabs) here, as
HTML by the page template (in column groups), plus the numeric CSV beside each. Builders for the method
comparison and the calibration table.

Every column names its epoch kind (analysis/runs.py: best selected on validation, best selected on test,
last); ECE, MCE and adaptive ECE are in percent everywhere ("ECE (%)"), the mean over seeds of each seed's
value. The frozen pre-trained teacher that every offline method evaluates inside its run is the teacher
row's network: it is shown there once, never per method and never bold."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from analysis.aggregate import CONFIDENCE, Aggregate, Difference, Stat
from analysis.calibration import MIN_BIN_COUNT, T_MAX, T_MIN
from analysis.registry import display_name
from analysis.runs import EPOCH_LABELS, EPOCH_SHORT
from reproduce.config import AnalysisConfig
from reproduce.metrics import DEFAULT_BINS

NOT_APPLICABLE = "—"  # the row has no such network (a vanilla student has no teacher)
MISSING = "missing"  # the network exists but this number could not be computed (see the notes)
FROZEN = "frozen (Teacher row)"  # an offline method's pre-trained teacher: the teacher row's network
NO_TS = "n/a (no val split)"  # temperature scaling needs a validation split; never fitted on test
REFERENCE = "reference"
VANILLA = "vanilla"  # the run label every student is compared with

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
    # Per column, the group it is shown in on the HTML page; "" = a key column, repeated in every group.
    groups: list[str] = field(default_factory=list)

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

    def html_parts(self) -> list[TablePart]:
        """The table as the page shows it: one part per column group, each repeating the key columns (those of
        group ""), so that a wide table reads without horizontal scrolling; the whole table when it has no
        groups. Markdown, LaTeX and CSV keep every column in one table."""
        sides = self.alignment()
        groups = self.groups or [""] * len(self.columns)
        named = list(dict.fromkeys(group for group in groups if group)) or [""]
        parts = []
        for name in named:
            chosen = [index for index, group in enumerate(groups) if group in ("", name)]
            parts.append(TablePart(name, [(self.columns[index], sides[index]) for index in chosen],
                                   [[(row[index], sides[index]) for index in chosen] for row in self.rows]))
        return parts


@dataclass(frozen=True)
class TablePart:
    """A group of a table's columns as one HTML table (analysis/templates/report.html.j2 draws it)."""

    title: str
    columns: list[tuple[str, str]]  # header, alignment (l or r)
    rows: list[list[tuple[Cell, str]]]


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
    needs_validation: bool = False  # temperature scaling: "n/a" without a validation split
    group: str = ""  # the HTML part it is shown in (Table.groups)

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


@dataclass(frozen=True, kw_only=True)
class DeltaColumn:
    """The student's top-1 minus the vanilla student's, in percentage points, with its interval."""

    header: str
    quantity: str
    network: str = "student"
    group: str = ""

    @property
    def key(self) -> str:
        return f"{self.network}_{self.quantity}_vs_{VANILLA}"


ACCURACY, STUDENT_CALIBRATION = "Accuracy", "Student calibration"


def comparison_columns(best_kind: str) -> list[Column | DeltaColumn]:
    best = EPOCH_SHORT[best_kind]
    accuracy, calibration = {"group": ACCURACY}, {"group": STUDENT_CALIBRATION, "network": "student", "better": "min"}
    return [
        Column(header=f"Teacher top-1, {best}", network="teacher", quantity=f"top1_{best_kind}", better="max",
               **accuracy),
        Column(header="Teacher top-1, last", network="teacher", quantity="top1_last", better="max", **accuracy),
        Column(header=f"Student top-1, {best}", network="student", quantity=f"top1_{best_kind}", better="max",
               **accuracy),
        Column(header="Student top-1, last", network="student", quantity="top1_last", better="max", **accuracy),
        DeltaColumn(header=f"Δ student top-1 vs vanilla, {best} (pp, {CONFIDENCE:.0%} CI)",
                    quantity=f"top1_{best_kind}", **accuracy),
        Column(header="Student ECE (%)", quantity=f"ece_{best_kind}", scale=100, **calibration),
        Column(header="Student ECE (%) after TS", quantity="ece_ts", scale=100, needs_validation=True, **calibration),
        Column(header="Student NLL", quantity=f"nll_{best_kind}", digits=3, **calibration),
        Column(header="Student Brier", quantity=f"brier_{best_kind}", digits=3, **calibration),
    ]


def ts_statement(has_validation: bool) -> str:
    if has_validation:
        return (f"TS: temperature scaling, T fitted on the validation logits of the same epoch (never on test), "
                f"bounded to [{T_MIN:g}, {T_MAX:g}], applied to test.")
    return ("TS: not available (n/a): these runs have no validation split (paper protocol, dataset.val_fraction "
            "= 0), and temperature scaling is never fitted on the test set.")


def comparison_caption(best_kind: str, has_validation: bool) -> str:
    best = EPOCH_SHORT[best_kind]
    return (f"Test set, mean ± sample std (n − 1) over seeds. {best}: the {EPOCH_LABELS[best_kind]}; last: the "
            f"last epoch. ECE (%), NLL and Brier at the {EPOCH_LABELS[best_kind]}; ECE (%): {DEFAULT_BINS} "
            f"equal-width bins (lo, hi], the mean over seeds of each seed's ECE, in percent. Δ vs vanilla: "
            f"student top-1 minus the vanilla student's, in percentage points, [{CONFIDENCE:.0%} Welch t interval] "
            f"over the seeds of the two methods (unequal variances; n/a with one seed on either side). "
            f"{ts_statement(has_validation)} {FROZEN}: the pre-trained teacher an offline method distils from "
            f"is the teacher run's network, the same in every offline run: shown once, in the Teacher (vanilla) "
            f"row, never bold. Bold: best per column (highest accuracy, lowest ECE/NLL/Brier). — : the run has no "
            f"such network.")


def _cell_state(aggregate: Aggregate, label: str, column: Measure, network: str, has_validation: bool) -> str:
    """"value", or why the cell holds no number."""
    if network not in aggregate.networks(label):
        return NOT_APPLICABLE
    if aggregate.is_frozen_teacher(label, network):
        return FROZEN
    if column.needs_validation and not has_validation:
        return NO_TS
    return "value"


def comparison_table(aggregate: Aggregate, labels: list[str], settings: AnalysisConfig, best_kind: str,
                     has_validation: bool) -> Table:
    columns = comparison_columns(best_kind)
    seeds = {label: len(aggregate.seeds(label)) for label in labels}
    plain = [column for column in columns if isinstance(column, Column)]
    state = {(label, column): _cell_state(aggregate, label, column, column.network, has_validation)
             for label in labels for column in plain}
    stats = {(label, column): aggregate.stat(label, column.network, column.quantity)
             if state[label, column] == "value" else None for label in labels for column in plain}
    best = {column: _best_labels(column, {label: stats[label, column] for label in labels}) for column in plain}

    rows, numeric = [], []
    for label in labels:
        cells = [Cell(display_name(label, settings))]
        values: dict[str, object] = {"label": label, "method": display_name(label, settings), "seeds": seeds[label],
                                     "best_epoch_kind": best_kind}
        for column in columns:
            if isinstance(column, DeltaColumn):
                text, difference = _delta_cell(aggregate, label, column, labels)
                cells.append(Cell(text))
                values.update({column.key: difference.estimate if difference else None,
                               f"{column.key}_ci_low": difference.low if difference else None,
                               f"{column.key}_ci_high": difference.high if difference else None,
                               f"{column.key}_df": difference.df if difference else None})
                continue
            stat = stats[label, column]
            cell_state = state[label, column]
            text = format_stat(stat, column.digits, column.scale, seeds[label]) if cell_state == "value" else cell_state
            cells.append(Cell(text, bold=label in best[column]))
            values.update({f"{column.key}_mean": stat.mean * column.scale if stat else None,
                           f"{column.key}_std": _scaled_std(stat, column.scale),
                           f"{column.key}_n": stat.n if stat else 0,
                           f"{column.key}_is_best": label in best[column],
                           f"{column.key}_frozen": cell_state == FROZEN})
        cells.append(Cell(str(seeds[label])))
        rows.append(cells)
        numeric.append(values)
    return Table("comparison", "Methods compared", comparison_caption(best_kind, has_validation),
                 ["Method", *(column.header for column in columns), "Seeds"], rows, pd.DataFrame(numeric),
                 groups=["", *(column.group for column in columns), ""])


def _delta_cell(aggregate: Aggregate, label: str, column: DeltaColumn, labels: list[str]
                ) -> tuple[str, Difference | None]:
    if column.network not in aggregate.networks(label):
        return NOT_APPLICABLE, None
    if label == VANILLA:
        return REFERENCE, None
    if VANILLA not in labels:
        return "no vanilla run", None
    difference = aggregate.difference(label, VANILLA, column.network, column.quantity)
    return (difference.text(2), difference) if difference else (MISSING, None)


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


BINNED, SCORES = "ECE, aECE and MCE", "Top-1, temperature, NLL and Brier"


def calibration_measures(best_kind: str) -> list[Measure]:
    binned, scores = {"group": BINNED}, {"group": SCORES}
    return [
        Measure(header=f"Top-1, {EPOCH_SHORT[best_kind]}", quantity=f"top1_{best_kind}", **scores),
        Measure(header="T", quantity="temperature", needs_validation=True, **scores),
        Measure(header="ECE (%)", quantity=f"ece_{best_kind}", scale=100, **binned),
        Measure(header="ECE (%) TS", quantity="ece_ts", scale=100, needs_validation=True, **binned),
        Measure(header="aECE (%)", quantity=f"adaptive_ece_{best_kind}", scale=100, **binned),
        Measure(header="aECE (%) TS", quantity="adaptive_ece_ts", scale=100, needs_validation=True, **binned),
        Measure(header=f"MCE (%), bins ≥ {MIN_BIN_COUNT}", quantity=f"mce_supported_{best_kind}", scale=100, **binned),
        Measure(header=f"MCE (%), bins ≥ {MIN_BIN_COUNT}, TS", quantity="mce_supported_ts", scale=100,
                needs_validation=True, **binned),
        Measure(header="NLL", quantity=f"nll_{best_kind}", digits=3, **scores),
        Measure(header="NLL TS", quantity="nll_ts", digits=3, needs_validation=True, **scores),
        Measure(header="Brier", quantity=f"brier_{best_kind}", digits=3, **scores),
        Measure(header="Brier TS", quantity="brier_ts", digits=3, needs_validation=True, **scores),
    ]


def calibration_caption(best_kind: str, has_validation: bool, n_bins: int) -> str:
    return (f"Every evaluated network, test set at the {EPOCH_LABELS[best_kind]}, mean ± sample std over seeds "
            f"(each seed's value, then the mean). ECE (%): {DEFAULT_BINS} equal-width bins (lo, hi] on the "
            f"top-label confidence (metrics.json); aECE (%): {n_bins} equal-mass bins. MCE (%): the largest gap "
            f"over the {n_bins} equal-width bins holding at least {MIN_BIN_COUNT} test predictions (a near-empty bin "
            f"has a gap of tens of points from a single error, so an MCE over every non-empty bin says little); "
            f"missing when no bin holds that many. {ts_statement(has_validation)} T > 1 softens an over-confident "
            f"network; T is the mean of the fits inside the bounds: a fit at a bound is counted (\"k of n at a "
            f"bound, excluded\") and left out of it (see the warnings), while its TS columns use the bound. TS "
            f"columns: the test numbers after dividing the logits by T; accuracy is unchanged by TS. An offline "
            f"method's frozen teacher is the Teacher (vanilla) row's network and is listed there only.")


def temperature_text(stat: Stat | None, at_bound: list[float], row_seeds: int) -> str:
    """The mean of the interior fits; a fit at a bound is counted, never averaged (analysis/calibration.py)."""
    excluded = int(sum(at_bound))
    if not excluded:
        return format_stat(stat, 2, row_seeds=row_seeds)
    shown = format_stat(stat, 2) if stat is not None else "no interior fit"
    return f"{shown} ({excluded} of {len(at_bound)} at a bound, excluded)"


def calibration_table(aggregate: Aggregate, labels: list[str], settings: AnalysisConfig, best_kind: str,
                      has_validation: bool) -> Table:
    measures = calibration_measures(best_kind)
    rows, numeric = [], []
    for label in labels:
        seeds = len(aggregate.seeds(label))
        for network in aggregate.networks(label):
            if aggregate.is_frozen_teacher(label, network):
                continue
            cells = [Cell(display_name(label, settings)), Cell(network)]
            values: dict[str, object] = {"label": label, "method": display_name(label, settings),
                                         "network": network, "seeds": seeds, "best_epoch_kind": best_kind}
            for measure in measures:
                available = has_validation or not measure.needs_validation
                stat = aggregate.stat(label, network, measure.quantity) if available else None
                text = format_stat(stat, measure.digits, measure.scale, seeds) if available else NO_TS
                if measure.quantity == "temperature" and available:
                    bounded = aggregate.values(label, network, "temperature_at_bound")
                    text = temperature_text(stat, bounded, seeds)
                    values["temperature_at_bound_n"] = int(sum(bounded))
                cells.append(Cell(text))
                values.update({f"{measure.key}_mean": stat.mean * measure.scale if stat else None,
                               f"{measure.key}_std": _scaled_std(stat, measure.scale),
                               f"{measure.key}_n": stat.n if stat else 0})
            cells.append(Cell(str(seeds)))
            rows.append(cells)
            numeric.append(values)
    return Table("calibration", "Calibration before and after temperature scaling",
                 calibration_caption(best_kind, has_validation, settings.n_bins),
                 ["Method", "Network", *(measure.header for measure in measures), "Seeds"], rows,
                 pd.DataFrame(numeric), align="ll" + "r" * (len(measures) + 1),
                 groups=["", "", *(measure.group for measure in measures), ""])
