"""Everything ``python -m analysis`` does, top to bottom: read the runs, compute calibration, write the
tables, figures, curated curves, ``summary.json`` and ``index.html`` under ``reports/``, and log the figures
to the trackers.

Outputs: ``tables/{comparison,calibration,paper_vs_reproduced,paper_reference,runs}.{md,tex,csv}``,
``figures/*.{png,pdf}``, ``plots/{student_test_top1,student_test_ece,student_train_loss,teacher_test_top1}.tsv``
(analysis/plots.py; for ``dvc plots``), ``summary.json`` (a few headline numbers per method, for
``dvc metrics show``) and the self-contained ``index.html``.

Conventions (also stated in the report): one protocol per analysis (analysis/runs.py), every number named
by its epoch kind; ECE in percent, the mean over seeds of each seed's ECE (analysis/calibration.py);
temperatures bounded to [T_MIN, T_MAX]; the difference to the vanilla student with a Welch t interval
(analysis/aggregate.py).
"""

from __future__ import annotations

import dataclasses
import html
import json
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from analysis import registry
from analysis.aggregate import Aggregate, build_records
from analysis.calibration import T_MAX, T_MIN, NetworkCalibration, calibrate_run, pool_bins
from analysis.figures import (
    curves_figure,
    method_overview_figure,
    reliability_figure,
    reliability_grid,
    save_figure,
    signal_names,
    signals_figure,
    sweep_figure,
)
from analysis.html import FigureEntry, Section, render_page
from analysis.plots import CURVES, write_curves
from analysis.published import PaperComparison, load_published, paper_vs_reproduced
from analysis.runs import EPOCH_LABELS, PROTOCOLS, AnalysisError, RunSet, Setup, load_runs
from analysis.settings import AnalysisSettings, parse_settings
from analysis.sweeps import Sweep, load_sweeps
from analysis.tables import VANILLA, Cell, Table, calibration_table, comparison_table, format_stat
from reproduce.config import Config, load_config
from reproduce.metrics import DEFAULT_BINS
from reproduce.tracking import Tracker, git_commit

OUTPUT_SUFFIXES = {"tables": (".md", ".tex", ".csv"), "figures": (".png", ".pdf"), "plots": (".tsv",)}
UNITS = ("top1: %, test set; ece_pct: ECE in percent (15 equal-width bins), the mean over seeds of each seed's "
         "ECE; _vs_vanilla: difference to the vanilla student in percentage points; _ts: after temperature "
         "scaling; every value is the mean over the method's seeds")
ECE_CONVENTION = ("ECE (%) everywhere (tables, figures, summary.json) is the mean over seeds of each seed's ECE, in "
                  "percent. The reliability diagrams draw the seeds' test predictions pooled into one set of bins "
                  "(the picture), and print that same mean over seeds.")
# The frozen teacher of an offline run and the teacher run it was loaded from score the same; beyond this
# (percentage points, a few images of a small test set) they are not the same network.
FROZEN_TEACHER_TOLERANCE = 0.1


@dataclass
class Report:
    out_dir: Path
    summary: dict[str, Any]
    notes: list[str]  # problems with the inputs
    tables: dict[str, Table]
    figures: list[FigureEntry]
    sweeps: list[Sweep]
    warnings: list[str]  # numbers to read with care (temperature fits at a bound)
    plots: dict[str, Path]  # the curated curves: stem -> reports/plots/<stem>.tsv


def run_analysis(runs_root: Path, sweeps_root: Path, out_dir: Path, params_path: Path, track: bool) -> Report:
    if not params_path.exists():
        raise AnalysisError(f"{params_path}: no such parameters file; run from the project root or pass --params")
    config = load_config(params_path)
    settings = parse_settings(config.analysis)
    published = load_published(settings.published_path(params_path))
    configured_selection = "test" if config.dataset.val_fraction == 0 else "val"
    runset = load_runs(runs_root, configured_selection)
    notes = runset.notes
    configured = Setup(config.dataset.name, config.models.teacher, config.models.student)
    if configured != runset.setup:
        notes.append(f"{params_path} configures {configured.describe()} but the runs were trained on "
                     f"{runset.setup.describe()}: the runs do not reflect the current parameters")
    if configured_selection != runset.selection:
        notes.append(f"{params_path} configures selection {configured_selection!r} (dataset.val_fraction = "
                     f"{config.dataset.val_fraction:g}) but the runs analysed have {runset.selection!r} "
                     f"({PROTOCOLS[runset.selection]}): they do not reflect the current parameters")
    if settings.n_bins != DEFAULT_BINS:
        notes.append(f"analysis.n_bins = {settings.n_bins} but metrics.json's ECE and MCE use {DEFAULT_BINS} bins: "
                     f"the tables' ECE/MCE are metrics.json's ({DEFAULT_BINS} bins); the diagrams, aECE and the TS "
                     f"columns use {settings.n_bins}")
    frozen_teachers, frozen_notes = check_frozen_teachers(runset, config.teacher.seed)
    notes += frozen_notes

    warnings: list[str] = []
    with single_thread_torch():
        calibrations = [result for run in runset.runs
                        for result in calibrate_run(run, settings.n_bins, notes, warnings)]
    aggregate = Aggregate(build_records(runset, calibrations), frozen_teachers)
    labels = settings.ordered(runset.labels)
    best_kind, has_validation = runset.best_kind, runset.has_validation
    paper = paper_vs_reproduced(published, aggregate, runset.setup, runset.selection, labels, settings)
    comparison = comparison_table(aggregate, labels, settings, best_kind, has_validation)
    calibration = calibration_table(aggregate, labels, settings, best_kind, has_validation)
    runs = runs_table(runset, labels, settings)
    tables = [comparison, calibration, paper.table, *([paper.reference] if paper.reference else []), runs]

    _remove_previous_outputs(out_dir)
    for table in tables:
        write_table(table, out_dir / "tables")
    plots = write_curves(runset, labels, out_dir / "plots", frozen_teachers)
    sweeps = load_sweeps(sweeps_root)
    figures_dir = out_dir / "figures"
    reliability = reliability_figures(calibrations, aggregate, labels, settings, figures_dir, best_kind)
    curves = curve_figures(runset, labels, settings, figures_dir, frozen_teachers)
    signals = signal_figures(runset, labels, settings, figures_dir)
    sweep_entries = sweep_figures(sweeps, settings, figures_dir)

    summary = build_summary(runset, aggregate, labels, notes, warnings)
    write_text(out_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    sections = [
        inputs_section(runs_root, sweeps_root, notes),
        protocol_section(runset),
        Section("comparison", "Methods compared", [f'<div class="scroll">{comparison.to_html()}</div>']),
        calibration_section(calibration, reliability, warnings, has_validation),
        paper_section(paper),
        curves_section(curves, plots),
        figures_section("signals", "Method signals", signals,
                        "No run logged a method signal (a signal/* column in history.tsv): "
                        f"methods present: {', '.join(labels)}."),
        sweeps_section(sweeps, sweep_entries, sweeps_root),
        metadata_section(runset, labels, runs, params_path),
    ]
    lead = (f"{runset.setup.dataset}, teacher {runset.setup.teacher} → student {runset.setup.student}; "
            f"{len(runset.runs)} runs of {len(labels)} methods; {PROTOCOLS[runset.selection]} (every \"best\" "
            f"here is the {EPOCH_LABELS[best_kind]}); analysis code at commit {_describe_commit(git_commit())}.")
    write_text(out_dir / "index.html", render_page("Knowledge-distillation reproduction report", lead, sections))

    figures = reliability + curves + signals + sweep_entries
    if track:
        log_to_trackers(config, settings, runset, figures, summary, out_dir)
    return Report(out_dir, summary, notes, {table.name: table for table in tables}, figures, sweeps, warnings, plots)


def check_frozen_teachers(runset: RunSet, teacher_seed: int) -> tuple[frozenset[str], list[str]]:
    """The labels whose ``teacher`` network is the teacher run's, to be reported once as the teacher row, and
    notes on those where it is not.

    An offline run loads runs/teacher/seed<teacher.seed>'s last epoch (final.pt), so its teacher network
    scores what that run scored at its last epoch. One that does not is not the same network (a stale run,
    or a teacher whose BatchNorm statistics follow the training batches, SOKD's frozen_bn: train): that
    label's teacher is then reported in its own row. Without the teacher run there is nothing to check
    and the registry's word stands."""
    labels = {run.label for run in runset.runs if registry.has_frozen_teacher(run.label)}
    source = {run.seed: run for run in runset.of("teacher")}.get(teacher_seed)
    expected = source.test_metrics("last", "teacher").get("top1") if source is not None else None
    if expected is None:
        return frozenset(labels), []
    notes, differing = [], set()
    for run in runset.runs:
        if run.label not in labels:
            continue
        frozen = run.test_metrics("last", "teacher").get("top1")
        if frozen is not None and abs(frozen - expected) > FROZEN_TEACHER_TOLERANCE:
            differing.add(run.label)
            notes.append(f"{run.path}: its teacher network scores {frozen:.2f} % test top-1 at the last epoch, "
                         f"{source.path} (the pre-trained teacher it loads) {expected:.2f} %: not the same network "
                         f"(a stale run, or BatchNorm statistics that follow training, e.g. SOKD frozen_bn: train): "
                         f"its teacher is reported in its own row")
    return frozenset(labels - differing), notes


@contextmanager
def single_thread_torch() -> Iterator[None]:
    """Temperature fits are many tiny LBFGS steps: torch's intra-op threads cost more to synchronise than they
    save (one fit took 5 s with two busy threads, 0.05 s with one)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _remove_previous_outputs(out_dir: Path) -> None:
    """A method removed since the last analysis must not leave its old figures and tables behind; only the
    file types this stage writes, in the folders it owns, are removed."""
    for folder, suffixes in OUTPUT_SUFFIXES.items():
        for path in (out_dir / folder).glob("*"):
            if path.is_file() and path.suffix in suffixes:
                path.unlink()


def write_text(path: Path, text: str) -> None:
    """A plain write (reproduce.io's atomic writes create owner-only files; reports are meant to be shared)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def write_table(table: Table, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_text(directory / f"{table.name}.md", table.to_markdown())
    write_text(directory / f"{table.name}.tex", table.to_latex())
    if table.numeric is not None:
        write_text(directory / f"{table.name}.csv", table.numeric.to_csv(index=False))


# ----------------------------------------------------------------------------------------------
# Figures


def ece_label(values: list[float]) -> str:
    """The ECE printed on a diagram: the mean over seeds of each seed's ECE, in percent."""
    mean = 100 * sum(values) / len(values)
    return f"ECE (%) {mean:.2f}, mean of {len(values)} seed(s)" if len(values) > 1 else f"ECE (%) {mean:.2f}"


def reliability_figures(calibrations: list[NetworkCalibration], aggregate: Aggregate, labels: list[str],
                        settings: AnalysisSettings, directory: Path, best_kind: str) -> list[FigureEntry]:
    grouped: dict[tuple[str, str], list[NetworkCalibration]] = defaultdict(list)
    for calibration in calibrations:
        grouped[calibration.label, calibration.network].append(calibration)
    epoch = EPOCH_LABELS[best_kind]
    pooling = ("bars: the seeds' test predictions pooled; the printed ECE (%): the mean over seeds of each seed's "
               "ECE, as in the tables")
    entries = []
    students = [label for label in labels if (label, "student") in grouped]
    for suffix, bins_of, metrics_of, description in (
            ("", lambda c: c.bins, lambda c: c.test, "before"),
            ("_ts", lambda c: c.bins_scaled, lambda c: c.test_scaled, "after")):
        panels = []
        for label in students:
            group = [c for c in grouped[label, "student"] if bins_of(c) is not None]
            if group:
                panels.append((settings.display_name(label), pool_bins([bins_of(c) for c in group]),
                               ece_label([metrics_of(c)["ece"] for c in group])))
        if not panels:
            continue  # after TS: none without a validation split
        title = f"Students' reliability, {description} temperature scaling"
        figure = reliability_grid(panels, settings.grid_columns)
        entries.append(FigureEntry(f"reliability_students{suffix}", title,
                                   f"Test set at the {epoch}, every method's student; {pooling}. Bars: accuracy "
                                   f"per confidence bin; hatched: the gap to the diagonal; below: share of samples per "
                                   f"bin, mean confidence (solid) and accuracy (dashed).",
                                   save_figure(figure, directory, f"reliability_students{suffix}", settings.png_dpi, settings.pdf),
                                   wide=True))
    for label in labels:
        for network in aggregate.networks(label):
            group = grouped.get((label, network))
            if not group or aggregate.is_frozen_teacher(label, network):
                continue  # a frozen teacher is the teacher row's network: drawn there once
            name = f"{settings.display_name(label)}, {network}"
            stem = f"reliability_{label}_{network}"
            figure = reliability_figure(pool_bins([c.bins for c in group]), name,
                                        ece_label([c.test["ece"] for c in group]))
            scaled = [c for c in group if c.test_scaled is not None]
            if scaled:
                temperature = aggregate.stat(label, network, "temperature")
                after = ece_label([c.test_scaled["ece"] for c in scaled])
                ts = (f"After temperature scaling (T = {format_stat(temperature, 2)}, fitted on validation, bounded to "
                      f"[{T_MIN:g}, {T_MAX:g}]): {after}.")
            else:
                ts = "Temperature scaling: not available (no validation split; it is never fitted on test)."
            caption = f"Test set at the {epoch}, {len(group)} seed(s); {pooling}. {ts}"
            entries.append(FigureEntry(stem, f"Reliability: {name}", caption,
                                       save_figure(figure, directory, stem, settings.png_dpi, settings.pdf), wide=False))
    return entries


def _histories(runset: RunSet, label: str) -> dict[int, pd.DataFrame]:
    return {run.seed: run.history for run in runset.of(label) if run.history is not None}


def curve_figures(runset: RunSet, labels: list[str], settings: AnalysisSettings, directory: Path,
                  frozen_teachers: frozenset[str]) -> list[FigureEntry]:
    entries = []
    histories = {label: _histories(runset, label) for label in labels}
    overview = method_overview_figure({label: seeds for label, seeds in histories.items() if seeds},
                                      {label: settings.display_name(label) for label in labels},
                                      frozen_teachers)
    if overview is not None:
        entries.append(FigureEntry("curves_overview", "Test top-1 per epoch, all methods",
                                   "Mean over seeds, band ± one std. Teacher networks: the teacher method and the "
                                   "online methods' (an offline method's frozen teacher is the teacher method's).",
                                   save_figure(overview, directory, "curves_overview", settings.png_dpi, settings.pdf), wide=True))
    for label in labels:
        figure = curves_figure(histories[label], settings.display_name(label))
        if figure is not None:
            entries.append(FigureEntry(f"curves_{label}", f"{settings.display_name(label)}: accuracy and loss",
                                       f"{len(histories[label])} seed(s); test solid, validation dashed; "
                                       f"mean ± one std.",
                                       save_figure(figure, directory, f"curves_{label}", settings.png_dpi, settings.pdf), wide=True))
    return entries


def signal_figures(runset: RunSet, labels: list[str], settings: AnalysisSettings, directory: Path) -> list[FigureEntry]:
    entries = []
    for label in labels:
        histories = _histories(runset, label)
        figure = signals_figure(histories, f"{settings.display_name(label)}: method signals")
        if figure is not None:
            entries.append(FigureEntry(f"signals_{label}", f"{settings.display_name(label)}: method signals",
                                       f"Signals logged (signal/* columns of history.tsv, per-epoch means over "
                                       f"steps): {', '.join(signal_names(histories))}; {len(histories)} seed(s), "
                                       f"mean ± one std.",
                                       save_figure(figure, directory, f"signals_{label}", settings.png_dpi, settings.pdf),
                                       wide=figure.get_figwidth() > 4))
    return entries


def sweep_figures(sweeps: list[Sweep], settings: AnalysisSettings, directory: Path) -> list[FigureEntry]:
    entries = []
    for sweep in sweeps:
        title = f"Sweep: {settings.display_name(sweep.method)}"
        figure = sweep_figure(sweep, title)
        if figure is not None:
            entries.append(FigureEntry(f"sweep_{sweep.method}", title,
                                       "Objective of every trial on the validation split carved from the training "
                                       "set, the best so far among complete trials, and each parameter's "
                                       "importance for it.",
                                       save_figure(figure, directory, f"sweep_{sweep.method}", settings.png_dpi, settings.pdf),
                                       wide=figure.get_figwidth() > 4))
    return entries


# ----------------------------------------------------------------------------------------------
# Run metadata, summary.json, trackers


def runs_table(runset: RunSet, labels: list[str], settings: AnalysisSettings) -> Table:
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
                      "python": environment.get("python"), "commit": _describe_commit(environment)}
            numeric.append(values)
            rows.append([Cell(settings.display_name(label)), *(Cell(_text(values[key])) for key in list(values)[1:])])
    return Table("runs", "Runs", "One row per run directory analysed; time and environment from metrics.json. "
                 "Selection: how the best epoch was chosen (val: on validation top-1; test: on test top-1, the "
                 "paper protocol).", columns, rows, pd.DataFrame(numeric), align="lrrlrlrrllll")


def _text(value: Any) -> str:
    if value is None:
        return "missing"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _describe_commit(environment: dict[str, Any]) -> str:
    commit = str(environment.get("commit", "unknown"))
    short = commit[:12] if commit != "unknown" else commit
    return f"{short} (uncommitted changes)" if environment.get("dirty") else short


SUMMARY_DIGITS = 4


def summary_metrics(aggregate: Aggregate, label: str, best_kind: str, has_validation: bool) -> dict[str, float]:
    """The headline numbers of one method (means over seeds), named by epoch kind so that a number selected on
    test and one selected on validation never share a key in `dvc metrics diff`."""
    wanted = {f"student_top1_{best_kind}": ("student", f"top1_{best_kind}", 1.0),
              "student_top1_last": ("student", "top1_last", 1.0),
              f"student_ece_pct_{best_kind}": ("student", f"ece_{best_kind}", 100.0)}
    if has_validation:
        wanted["student_ece_pct_ts"] = ("student", "ece_ts", 100.0)
    if not aggregate.is_frozen_teacher(label, "teacher"):  # a frozen teacher is the teacher method's numbers
        wanted.update({f"teacher_top1_{best_kind}": ("teacher", f"top1_{best_kind}", 1.0),
                       "teacher_top1_last": ("teacher", "top1_last", 1.0)})
    values: dict[str, float] = {}
    for key, (network, quantity, scale) in wanted.items():
        stat = aggregate.stat(label, network, quantity) if network in aggregate.networks(label) else None
        if stat is not None:
            values[key] = round(stat.mean * scale, SUMMARY_DIGITS)
    if label != VANILLA and "student" in aggregate.networks(label):
        difference = aggregate.difference(label, VANILLA, "student", f"top1_{best_kind}")
        if difference is not None:
            values[f"student_top1_{best_kind}_vs_vanilla"] = round(difference.estimate, SUMMARY_DIGITS)
    return values


def build_summary(runset: RunSet, aggregate: Aggregate, labels: list[str], notes: list[str],
                  warnings: list[str]) -> dict[str, Any]:
    """reports/summary.json, what `dvc metrics show` lists: a few headline numbers per method. Every number
    behind the tables is in tables/*.csv."""
    best_kind = runset.best_kind
    methods = {label: {"seeds": len(aggregate.seeds(label)),
                       **summary_metrics(aggregate, label, best_kind, runset.has_validation)} for label in labels}
    setup = runset.setup
    return {"dataset": setup.dataset, "teacher": setup.teacher, "student": setup.student,
            "selection": runset.selection, "best_epoch": EPOCH_LABELS[best_kind], "units": UNITS,
            "input_notes": len(notes), "warnings": len(warnings), "methods": methods}


def log_to_trackers(config: Config, settings: AnalysisSettings, runset: RunSet, figures: list[FigureEntry],
                    summary: dict[str, Any], out_dir: Path) -> None:
    """One "analysis" run in W&B and MLflow holding every figure and the report. A Tracker also writes the
    summary it sends to a metrics.json in its run folder: summary.json is already that, so the folder is a
    scratch one."""
    setup = runset.setup
    with tempfile.TemporaryDirectory(prefix="analysis-tracker-") as scratch:
        tracker = Tracker(config.tracking, run_dir=Path(scratch), run_name="analysis",
                          tags={"stage": "analysis", "dataset": setup.dataset, "teacher": setup.teacher,
                                "student": setup.student},
                          params={"analysis": dataclasses.asdict(settings),
                                  "runs": {label: [run.seed for run in runset.of(label)] for label in runset.labels}})
        for entry in figures:
            tracker.log_image(f"analysis/{entry.stem}", entry.png)
        tracker.log_artifact(out_dir / "index.html", kind="report")
        tracker.finish(summary)


# ----------------------------------------------------------------------------------------------
# Page sections


def inputs_section(runs_root: Path, sweeps_root: Path, notes: list[str]) -> Section:
    section = Section("inputs", "Inputs")
    section.paragraph(f"Runs read from {runs_root}; sweeps from {sweeps_root}.")
    if notes:
        section.paragraph(f"{len(notes)} problem(s) with the inputs; the numbers below leave out what is listed:")
        section.items(notes, "notes")
    else:
        section.paragraph("Every run had metrics.json, history.tsv and predictions.pt.", "ok")
    return section


def protocol_section(runset: RunSet) -> Section:
    section = Section("protocol", "Protocol")
    kind = runset.best_kind
    section.paragraph(f"These runs: {PROTOCOLS[runset.selection]}. Every \"best\" number in this report is the "
                      f"{EPOCH_LABELS[kind]} (metrics.json \"{kind}\"); \"last\" is the last epoch.", "statement")
    if runset.selection == "test":
        section.paragraph("A best epoch selected on test is optimistic (the test set chose it); it is what the papers "
                          "report, so it is the number set beside theirs. The last epoch is not selected on anything.")
    else:
        section.paragraph("A best epoch selected on validation is not the papers' convention (they select on test): "
                          "their best-epoch numbers are shown as not comparable; rerun with dataset.val_fraction=0 "
                          "(paper protocol) to compare them.")
    return section


def calibration_section(table: Table, figures: list[FigureEntry], warnings: list[str], has_validation: bool) -> Section:
    section = Section("calibration", "Calibration")
    if has_validation:
        section.paragraph(f"Temperature scaling: T fitted on the validation logits of the best epoch, never on test, "
                          f"bounded to [{T_MIN:g}, {T_MAX:g}] (a factor of ten either way around T = 1, beyond any "
                          f"temperature reported for image classifiers; at a bound the validation NLL has no interior "
                          f"minimum, e.g. a validation split without errors drives T towards 0).")
    else:
        section.paragraph("Temperature scaling: not available. These runs have no validation split (paper protocol, "
                          "dataset.val_fraction = 0) and a temperature is never fitted on the test set.", "notes")
    if warnings:
        section.paragraph(f"{len(warnings)} temperature fit(s) to read with care:")
        section.items(warnings, "notes")
    section.paragraph(ECE_CONVENTION)
    section.table(table)
    section.figures(figures)
    return section


def curves_section(figures: list[FigureEntry], plots: dict[str, Path]) -> Section:
    section = Section("curves", "Training curves")
    if figures:
        section.figures(figures)
    else:
        section.paragraph("No run has a history.tsv: no curves.")
    listed = "; ".join(f"plots/{path.name}: {curve.title}" for curve in CURVES if (path := plots.get(curve.stem)))
    section.paragraph(f"Curated curves for `dvc plots show` (wide TSVs: the column epoch, then one column per run label; "
                      f"each cell is the mean over seeds at that epoch; ECE in percent; the teacher curve holds the "
                      f"teacher method and the online methods, not the frozen teachers): {listed}.")
    return section


def paper_section(paper: PaperComparison) -> Section:
    section = Section("paper", "Paper vs reproduced")
    section.paragraph(paper.statement, "statement")
    section.table(paper.table)
    if paper.reference is not None:
        section.collapsed(f"{paper.reference.title} ({len(paper.reference.rows)} rows)",
                          f'<div class="scroll">{paper.reference.to_html()}</div>')
    return section


def figures_section(anchor: str, title: str, figures: list[FigureEntry], empty: str) -> Section:
    section = Section(anchor, title)
    if figures:
        section.figures(figures)
    else:
        section.paragraph(empty)
    return section


def sweeps_section(sweeps: list[Sweep], figures: list[FigureEntry], sweeps_root: Path) -> Section:
    section = Section("sweeps", "Sweeps")
    if not sweeps:
        section.paragraph(f"No sweep was run: {sweeps_root} does not exist or holds no method folder "
                          f"(`dvc repro` runs the sweep@<method> stages).")
        return section
    by_method = {entry.stem.removeprefix("sweep_"): entry for entry in figures}
    for sweep in sweeps:
        section.heading(sweep.method)
        if sweep.method in by_method:
            section.figures([by_method[sweep.method]])
        if sweep.best_params is not None:
            section.paragraph("Best parameters (best_params.yaml):")
            section.preformatted(sweep.best_params)
        if sweep.notes:
            section.items(sweep.notes, "notes")
    return section


def metadata_section(runset: RunSet, labels: list[str], runs: Table, params_path: Path) -> Section:
    section = Section("metadata", "Run metadata")
    setup = runset.setup
    seeds = "; ".join(f"{label}: {', '.join(str(run.seed) for run in runset.of(label))}" for label in labels)
    commits = sorted({_describe_commit(run.metrics.get("environment", {})) for run in runset.runs})
    section.paragraph(f"Dataset {setup.dataset}; teacher {setup.teacher}; student {setup.student}. Seeds — {seeds}. "
                      f"Training commits: {', '.join(commits)}.")
    section.table(runs)
    parameters = params_path.read_text()
    section.collapsed(f"Parameters: {params_path} ({len(parameters.splitlines())} lines)",
                      f"<pre>{html.escape(parameters)}</pre>")
    return section
