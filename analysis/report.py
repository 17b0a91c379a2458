"""Everything ``python -m analysis`` does, top to bottom: read the runs, compute calibration, write the
tables, figures, curated curves, ``summary.json`` and ``index.html`` under ``reports/``, and log the figures
to the trackers.

Outputs: ``tables/{comparison,calibration,paper_vs_reproduced,paper_reference,runs}.{md,tex,csv}``,
``figures/*.{png,pdf}`` (analysis/report_figures.py), ``plots/{student_test_top1,student_test_ece,
student_train_loss,teacher_test_top1}.tsv`` (analysis/plots.py; for ``dvc plots``), ``summary.json``
(analysis/summary.py; for ``dvc metrics show``) and the self-contained ``index.html``, whose prose and layout
are analysis/templates/report.html.j2 (analysis/page.py).

Conventions (also stated in the report): one protocol per analysis (analysis/runs.py), every number named
by its epoch kind; ECE in percent, the mean over seeds of each seed's ECE (analysis/calibration.py);
temperatures bounded to [T_MIN, T_MAX], fits at a bound left out of the mean temperature; the difference to
the vanilla student with a Welch t interval (analysis/aggregate.py).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from analysis.aggregate import Aggregate, build_records
from analysis.calibration import MIN_BIN_COUNT, T_MAX, T_MIN, calibrate_run
from analysis.metadata import describe_commit, runs_table, seeds_text, training_commits
from analysis.page import FigureEntry, render_page
from analysis.plots import CURVES, write_curves
from analysis.published import load_published, paper_vs_reproduced, published_path
from analysis.registry import display_name, has_frozen_teacher, ordered
from analysis.report_figures import curve_figures, reliability_figures, signal_figures, sweep_figures
from analysis.runs import EPOCH_LABELS, PROTOCOLS, AnalysisError, RunSet, Setup, load_runs
from analysis.summary import build_summary
from analysis.sweeps import Sweep, load_sweeps
from analysis.tables import Table, calibration_table, comparison_table
from reproduce.config import AnalysisConfig, Config, load_config
from reproduce.io import atomic_write_text
from reproduce.metrics import DEFAULT_BINS
from reproduce.tracking import Tracker, git_commit

OUTPUT_SUFFIXES = {"tables": (".md", ".tex", ".csv"), "figures": (".png", ".pdf"), "plots": (".tsv",)}
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
    settings = config.analysis
    published = load_published(published_path(settings, params_path))
    runset = load_runs(runs_root, "test" if config.dataset.val_fraction == 0 else "val")
    notes = runset.notes + configuration_notes(config, settings, runset, params_path)
    frozen_teachers, frozen_notes = check_frozen_teachers(runset, config.teacher.seed)
    notes += frozen_notes

    warnings: list[str] = []
    with single_thread_torch():
        calibrations = [result for run in runset.runs
                        for result in calibrate_run(run, settings.n_bins, notes, warnings)]
    aggregate = Aggregate(build_records(runset, calibrations), frozen_teachers)
    labels = ordered(runset.labels, settings)
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
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    page = render_page(
        title="Knowledge-distillation reproduction report", setup=runset.setup, run_count=len(runset.runs),
        labels=labels, protocol=PROTOCOLS[runset.selection], best_kind=best_kind, best_label=EPOCH_LABELS[best_kind],
        has_validation=has_validation, commit=describe_commit(git_commit()), runs_root=runs_root,
        sweeps_root=sweeps_root, notes=notes, warnings=warnings, tables={table.name: table for table in tables},
        paper=paper, figures_by_section={"reliability": reliability, "curves": curves, "signals": signals},
        curve_files=[f"plots/{path.name}: {curve.title}" for curve in CURVES if (path := plots.get(curve.stem))],
        sweeps=sweeps, sweep_figures=sweep_entries,
        sweep_names={sweep.method: display_name(sweep.method, settings) for sweep in sweeps},
        t_min=f"{T_MIN:g}", t_max=f"{T_MAX:g}", min_bin_count=MIN_BIN_COUNT, seeds=seeds_text(runset, labels),
        commits=training_commits(runset), params_path=params_path, params_text=params_path.read_text())
    atomic_write_text(out_dir / "index.html", page)

    figures = reliability + curves + signals + [entry for entries in sweep_entries.values() for entry in entries]
    if track:
        log_to_trackers(config, settings, runset, figures, summary, out_dir)
    return Report(out_dir, summary, notes, {table.name: table for table in tables}, figures, sweeps, warnings, plots)


def configuration_notes(config: Config, settings: AnalysisConfig, runset: RunSet, params_path: Path) -> list[str]:
    """Where the runs do not reflect the parameters file, or the analysis' bins differ from metrics.json's."""
    notes = []
    configured = Setup(config.dataset.name, config.models.teacher, config.models.student)
    if configured != runset.setup:
        notes.append(f"{params_path} configures {configured.describe()} but the runs were trained on "
                     f"{runset.setup.describe()}: the runs do not reflect the current parameters")
    configured_selection = "test" if config.dataset.val_fraction == 0 else "val"
    if configured_selection != runset.selection:
        notes.append(f"{params_path} configures selection {configured_selection!r} (dataset.val_fraction = "
                     f"{config.dataset.val_fraction:g}) but the runs analysed have {runset.selection!r} "
                     f"({PROTOCOLS[runset.selection]}): they do not reflect the current parameters")
    if settings.n_bins != DEFAULT_BINS:
        notes.append(f"analysis.n_bins = {settings.n_bins} but metrics.json's ECE uses {DEFAULT_BINS} bins: the "
                     f"tables' ECE is metrics.json's ({DEFAULT_BINS} bins); the diagrams, aECE, MCE and the TS "
                     f"columns use {settings.n_bins}")
    return notes


def check_frozen_teachers(runset: RunSet, teacher_seed: int) -> tuple[frozenset[str], list[str]]:
    """The labels whose ``teacher`` network is the teacher run's, to be reported once as the teacher row, and
    notes on those where it is not.

    An offline run loads runs/teacher/seed<teacher.seed>'s last epoch (final.pt), so its teacher network
    scores what that run scored at its last epoch. One that does not is not the same network (a stale run,
    or a teacher whose BatchNorm statistics follow the training batches, SOKD's frozen_bn: train): that
    label's teacher is then reported in its own row. Without the teacher run there is nothing to check
    and the registry's word stands."""
    labels = {run.label for run in runset.runs if has_frozen_teacher(run.label)}
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
    """Calibration is many small reductions (a temperature fit is a few dozen): torch's intra-op threads cost
    more to synchronise than they save on a busy machine."""
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


def write_table(table: Table, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / f"{table.name}.md", table.to_markdown())
    atomic_write_text(directory / f"{table.name}.tex", table.to_latex())
    if table.numeric is not None:
        atomic_write_text(directory / f"{table.name}.csv", table.numeric.to_csv(index=False))


def log_to_trackers(config: Config, settings: AnalysisConfig, runset: RunSet, figures: list[FigureEntry],
                    summary: dict[str, Any], out_dir: Path) -> None:
    """One "analysis" run in W&B and MLflow holding every figure and the report. A Tracker also writes the
    summary it sends to a metrics.json in its run folder: summary.json is already that, so the folder is a
    scratch one."""
    setup = runset.setup
    with tempfile.TemporaryDirectory(prefix="analysis-tracker-") as scratch:
        tracker = Tracker(config.tracking, run_dir=Path(scratch), run_name="analysis",
                          tags={"stage": "analysis", "dataset": setup.dataset, "teacher": setup.teacher,
                                "student": setup.student},
                          params={"analysis": settings.model_dump(),
                                  "runs": {label: [run.seed for run in runset.of(label)] for label in runset.labels}},
                          job_type="analysis")
        for entry in figures:
            tracker.log_image(f"analysis/{entry.stem}", entry.png)
        tracker.log_artifact(out_dir / "index.html", kind="report")
        tracker.finish(summary)
