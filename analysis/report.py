"""Everything ``python -m analysis`` does, top to bottom: read the runs, compute calibration, write the
tables, figures, ``summary.json`` and ``index.html`` under ``reports/``, and log the figures to the trackers.
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

from analysis.aggregate import Aggregate, build_records
from analysis.calibration import NetworkCalibration, calibrate_run, pool_bins
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
from analysis.published import PaperComparison, load_published, paper_vs_reproduced
from analysis.runs import AnalysisError, RunSet, Setup, load_runs
from analysis.settings import AnalysisSettings, parse_settings
from analysis.sweeps import Sweep, load_sweeps
from analysis.tables import Cell, Table, calibration_table, comparison_table, format_stat
from reproduce.config import Config, load_config
from reproduce.tracking import Tracker, git_commit, start_tracking_service

OUTPUT_SUFFIXES = {"tables": (".md", ".tex", ".csv"), "figures": (".png", ".pdf")}
UNITS = "top1: %; ece, brier: fractions; nll: nats; temperature: T of logits / T; _ts: after temperature scaling"
# What `dvc metrics show` lists per method and network (every quantity is in tables/calibration.csv).
SUMMARY_QUANTITIES = ("top1_best", "top1_last", "ece_best", "ece_ts", "nll_best", "brier_best", "temperature")


@dataclass
class Report:
    out_dir: Path
    summary: dict[str, Any]
    notes: list[str]
    tables: dict[str, Table]
    figures: list[FigureEntry]
    sweeps: list[Sweep]


def run_analysis(runs_root: Path, sweeps_root: Path, out_dir: Path, params_path: Path, track: bool) -> Report:
    if not params_path.exists():
        raise AnalysisError(f"{params_path}: no such parameters file; run from the project root or pass --params")
    config = load_config(params_path)
    if track:
        start_tracking_service(config.tracking)  # W&B and MLflow start while the figures are drawn
    settings = parse_settings(config.analysis)
    published = load_published(settings.published_path(params_path))
    runset = load_runs(runs_root)
    notes = runset.notes
    configured = Setup(config.dataset.name, config.models.teacher, config.models.student)
    if configured != runset.setup:
        notes.append(f"{params_path} configures {configured.describe()} but the runs were trained on "
                     f"{runset.setup.describe()}: the runs do not reflect the current parameters")

    with single_thread_torch():
        calibrations = [result for run in runset.runs for result in calibrate_run(run, settings.n_bins, notes)]
    aggregate = Aggregate(build_records(runset, calibrations))
    labels = settings.ordered(runset.labels)
    paper = paper_vs_reproduced(published, aggregate, runset.setup, labels, settings)
    comparison = comparison_table(aggregate, labels, settings)
    calibration = calibration_table(aggregate, labels, settings)
    runs = runs_table(runset, labels, settings)
    tables = [comparison, calibration, paper.table, *([paper.reference] if paper.reference else []), runs]

    _remove_previous_outputs(out_dir)
    for table in tables:
        write_table(table, out_dir / "tables")
    sweeps = load_sweeps(sweeps_root)
    figures_dir = out_dir / "figures"
    reliability = reliability_figures(calibrations, aggregate, labels, settings, figures_dir)
    curves = curve_figures(runset, labels, settings, figures_dir)
    signals = signal_figures(runset, labels, settings, figures_dir)
    sweep_entries = sweep_figures(sweeps, settings, figures_dir)

    summary = build_summary(runset, aggregate, labels, notes)
    write_text(out_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    sections = [
        inputs_section(runs_root, sweeps_root, notes),
        Section("comparison", "Methods compared", [f'<div class="scroll">{comparison.to_html()}</div>']),
        calibration_section(calibration, reliability),
        paper_section(paper),
        figures_section("curves", "Training curves", curves, "No run has a history.tsv: no curves."),
        figures_section("signals", "Method signals", signals,
                        "No run logged a method signal (a signal/* column in history.tsv): "
                        f"methods present: {', '.join(labels)}."),
        sweeps_section(sweeps, sweep_entries, sweeps_root),
        metadata_section(runset, labels, runs, params_path),
    ]
    lead = (f"{runset.setup.dataset}, teacher {runset.setup.teacher} → student {runset.setup.student}; "
            f"{len(runset.runs)} runs of {len(labels)} methods; analysis code at commit "
            f"{_describe_commit(git_commit())}.")
    write_text(out_dir / "index.html", render_page("Knowledge-distillation reproduction report", lead, sections))

    figures = reliability + curves + signals + sweep_entries
    if track:
        log_to_trackers(config, settings, runset, figures, summary, out_dir)
    return Report(out_dir, summary, notes, {table.name: table for table in tables}, figures, sweeps)


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


def reliability_figures(calibrations: list[NetworkCalibration], aggregate: Aggregate, labels: list[str],
                        settings: AnalysisSettings, directory: Path) -> list[FigureEntry]:
    grouped: dict[tuple[str, str], list[NetworkCalibration]] = defaultdict(list)
    for calibration in calibrations:
        grouped[calibration.label, calibration.network].append(calibration)
    entries = []
    students = [label for label in labels if (label, "student") in grouped]
    for suffix, attribute, description in (("", "bins", "before"), ("_ts", "bins_scaled", "after")):
        if not students:
            break
        panels = [(settings.display_name(label), pool_bins([getattr(c, attribute) for c in grouped[label, "student"]]))
                  for label in students]
        title = f"Students' reliability, {description} temperature scaling"
        figure = reliability_grid(panels, settings.grid_columns)
        entries.append(FigureEntry(f"reliability_students{suffix}", title,
                                   "Test set at the best epoch, every method's student, seeds pooled. Bars: accuracy "
                                   f"per confidence bin; hatched: the gap to the diagonal; below: share of samples per "
                                   f"bin, mean confidence (solid) and accuracy (dashed).",
                                   save_figure(figure, directory, f"reliability_students{suffix}", settings.png_dpi),
                                   wide=True))
    for label in labels:
        for network in aggregate.networks(label):
            group = grouped.get((label, network))
            if not group:
                continue
            name = f"{settings.display_name(label)}, {network}"
            stem = f"reliability_{label}_{network}"
            figure = reliability_figure(pool_bins([c.bins for c in group]), name)
            temperature = aggregate.stat(label, network, "temperature")
            after = aggregate.stat(label, network, "ece_ts")
            caption = (f"Test set at the best epoch, {len(group)} seed(s) pooled. After temperature scaling "
                       f"(T = {format_stat(temperature, 2)}, fitted on validation): ECE "
                       f"{format_stat(after, 2, 100)} % (mean over seeds).")
            entries.append(FigureEntry(stem, f"Reliability: {name}", caption,
                                       save_figure(figure, directory, stem, settings.png_dpi), wide=False))
    return entries


def _histories(runset: RunSet, label: str) -> dict[int, pd.DataFrame]:
    return {run.seed: run.history for run in runset.of(label) if run.history is not None}


def curve_figures(runset: RunSet, labels: list[str], settings: AnalysisSettings, directory: Path) -> list[FigureEntry]:
    entries = []
    histories = {label: _histories(runset, label) for label in labels}
    overview = method_overview_figure({label: seeds for label, seeds in histories.items() if seeds},
                                      {label: settings.display_name(label) for label in labels})
    if overview is not None:
        entries.append(FigureEntry("curves_overview", "Test top-1 per epoch, all methods",
                                   "Mean over seeds, band ± one std.",
                                   save_figure(overview, directory, "curves_overview", settings.png_dpi), wide=True))
    for label in labels:
        figure = curves_figure(histories[label], settings.display_name(label))
        if figure is not None:
            entries.append(FigureEntry(f"curves_{label}", f"{settings.display_name(label)}: accuracy and loss",
                                       f"{len(histories[label])} seed(s); test solid, validation dashed; "
                                       f"mean ± one std.",
                                       save_figure(figure, directory, f"curves_{label}", settings.png_dpi), wide=True))
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
                                       save_figure(figure, directory, f"signals_{label}", settings.png_dpi),
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
                                       save_figure(figure, directory, f"sweep_{sweep.method}", settings.png_dpi),
                                       wide=figure.get_figwidth() > 4))
    return entries


# ----------------------------------------------------------------------------------------------
# Run metadata, summary.json, trackers


def runs_table(runset: RunSet, labels: list[str], settings: AnalysisSettings) -> Table:
    columns = ["Method", "Seed", "Epochs", "Best epoch", "Networks", "Train s", "Images/s", "Device", "torch",
               "Python", "Commit"]
    rows, numeric = [], []
    for label in labels:
        for run in runset.of(label):
            metrics = run.metrics
            time = metrics.get("time", {})
            environment = metrics.get("environment", {})
            values = {"label": label, "seed": run.seed, "epochs": metrics.get("epochs"),
                      "best_epoch": metrics["best"]["epoch"], "networks": " ".join(run.networks),
                      "train_s": time.get("train_s"), "images_per_s": time.get("images_per_s"),
                      "device": environment.get("device"), "torch": environment.get("torch"),
                      "python": environment.get("python"), "commit": _describe_commit(environment)}
            numeric.append(values)
            rows.append([Cell(settings.display_name(label)), *(Cell(_text(values[key])) for key in list(values)[1:])])
    return Table("runs", "Runs", "One row per run directory analysed; time and environment from metrics.json.",
                 columns, rows, pd.DataFrame(numeric), align="lrrrlrrllll")


def _text(value: Any) -> str:
    if value is None:
        return "missing"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _describe_commit(environment: dict[str, Any]) -> str:
    commit = str(environment.get("commit", "unknown"))
    short = commit[:12] if commit != "unknown" else commit
    return f"{short} (uncommitted changes)" if environment.get("dirty") else short


def build_summary(runset: RunSet, aggregate: Aggregate, labels: list[str], notes: list[str]) -> dict[str, Any]:
    methods = {}
    for label in labels:
        networks = {}
        for network in aggregate.networks(label):
            stats = {quantity: aggregate.stat(label, network, quantity) for quantity in SUMMARY_QUANTITIES}
            networks[network] = {quantity: stat.as_dict() for quantity, stat in stats.items() if stat is not None}
        methods[label] = {"seeds": len(aggregate.seeds(label)), "networks": networks}
    setup = runset.setup
    return {"dataset": setup.dataset, "teacher": setup.teacher, "student": setup.student, "units": UNITS,
            "input_notes": len(notes), "methods": methods}


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


def calibration_section(table: Table, figures: list[FigureEntry]) -> Section:
    section = Section("calibration", "Calibration")
    section.table(table)
    section.figures(figures)
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
