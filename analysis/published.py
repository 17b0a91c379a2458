"""Paper vs reproduced: published top-1 beside ours, like with like only.

A published number is set against our runs only when the dataset, the teacher -> student pair and the
measurement convention all match. Each source's convention (published_results.yaml) says which epoch it
reports: the papers' "best" epoch is chosen on the TEST set, so it is set beside our best epoch selected
on test (runs of the paper protocol, dataset.val_fraction = 0) and never beside a best epoch selected on
validation: with such runs the row says "not comparable" and how to rerun. A "last" epoch is set beside
our last epoch. Our column names our convention and seed count. Methods whose papers gave no numbers say
"not published"; when no published number exists for our dataset and pair the table says so and lists,
for reference only, what would be compared on the papers' main dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from analysis.aggregate import Aggregate, Stat
from analysis.runs import EPOCH_LABELS, AnalysisError, Setup
from analysis.registry import display_name, ordered
from analysis.tables import Cell, Table, format_stat
from reproduce.config import AnalysisConfig

NO_RUN = "no run"
NOT_PUBLISHED = "not published"
NOT_COMPARABLE = "not comparable"
NOT_COMPARABLE_TEXT = ("not comparable: the paper's best epoch is selected on test, our runs select on validation; "
                       "rerun with dataset.val_fraction=0 (paper protocol)")
PUBLISHED_EPOCHS = ("best", "last")  # a source's convention.epoch
RESULT_KEYS = {"source", "dataset", "run", "network", "teacher", "student", "top1", "std"}


@dataclass(frozen=True)
class Convention:
    epoch: str  # "best" (the papers pick it on the test set) or "last"
    seeds: int
    description: str

    def __post_init__(self) -> None:
        if self.epoch not in PUBLISHED_EPOCHS:
            raise ValueError(f"convention epoch {self.epoch!r} is not one of {PUBLISHED_EPOCHS}")

    def our_kind(self, selection: str) -> str | None:
        """The epoch kind of ours measured the same way (analysis/runs.py), None when our runs have none."""
        if self.epoch == "last":
            return "last"
        return "best_test_selected" if selection == "test" else None


@dataclass(frozen=True)
class Source:
    citation: str
    convention: Convention


@dataclass(frozen=True)
class PublishedResult:
    source: Source
    dataset: str
    run: str  # our run label: runs/<run>/
    network: str
    teacher: str | None  # None: the number does not depend on the teacher (a network trained alone)
    student: str | None
    top1: float
    std: float | None

    def matches(self, setup: Setup) -> bool:
        return (self.dataset == setup.dataset and self.teacher in (None, setup.teacher)
                and self.student in (None, setup.student))

    @property
    def pair(self) -> str:
        if self.teacher and self.student:
            return f"{self.teacher}→{self.student}"
        return f"{self.teacher} (teacher alone)" if self.teacher else f"{self.student} (student alone)"

    def published_text(self) -> str:
        text = f"{self.top1:.2f}" + (f" ± {self.std:.2f}" if self.std is not None else "")
        return f"{text} (n={self.source.convention.seeds})"


@dataclass(frozen=True)
class Unpublished:
    citation: str
    note: str


@dataclass
class Published:
    results: list[PublishedResult]
    not_published: dict[str, Unpublished]  # run label -> why there is no number


def published_path(settings: AnalysisConfig, params_path: Path) -> Path:
    """``analysis.published_results``; a relative path is read from the folder of params.yaml (the project root)."""
    path = Path(settings.published_results)
    return path if path.is_absolute() else params_path.resolve().parent / path


def load_published(path: Path) -> Published:
    if not path.exists():
        raise AnalysisError(f"published results file {path} not found (analysis.published_results in params.yaml)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        sources = {key: Source(str(value["citation"]), Convention(**value["convention"]))
                   for key, value in raw["sources"].items()}
        results = [_result(row, sources) for row in raw["results"]]
        not_published = {label: Unpublished(str(value["citation"]), str(value["note"]))
                         for label, value in raw.get("not_published", {}).items()}
    except (yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise AnalysisError(f"{path}: malformed published results ({type(error).__name__}: {error}); see the "
                            f"comments at the top of analysis/published_results.yaml for the format") from error
    return Published(results, not_published)


def _result(row: dict[str, Any], sources: dict[str, Source]) -> PublishedResult:
    unknown = set(row) - RESULT_KEYS
    if unknown:
        raise ValueError(f"row {row}: unknown keys {sorted(unknown)}")
    if row["source"] not in sources:
        raise ValueError(f"row {row}: source {row['source']!r} is not one of {sorted(sources)}")
    return PublishedResult(sources[row["source"]], str(row["dataset"]), str(row["run"]), str(row["network"]),
                           row.get("teacher"), row.get("student"), float(row["top1"]),
                           float(row["std"]) if row.get("std") is not None else None)


# ----------------------------------------------------------------------------------------------


@dataclass
class PaperComparison:
    statement: str  # one sentence on what could be compared
    table: Table
    reference: Table | None  # published numbers on the reference dataset, never set against our runs


COLUMNS = ["Method", "Network", "Dataset", "Pair", "Published: convention", "Published", "Ours: convention",
           "Ours", "Δ (ours − paper)", "Source / note"]


def our_convention(kind: str, stat: Stat | None) -> str:
    if stat is None:
        return f"{EPOCH_LABELS[kind]}"
    if stat.n == 1:
        return f"{EPOCH_LABELS[kind]}, one seed"
    return f"{EPOCH_LABELS[kind]}, mean ± std over {stat.n} seeds"


def paper_vs_reproduced(published: Published, aggregate: Aggregate, setup: Setup, selection: str,
                        labels: list[str], settings: AnalysisConfig) -> PaperComparison:
    """``selection``: our runs' ("val" or "test"); it decides which published conventions we can meet."""
    rows: list[list[Cell]] = []
    numeric: list[dict[str, Any]] = []
    best_kind = "best" if selection == "val" else "best_test_selected"

    def add(label: str, network: str, dataset: str, pair: str, published_convention: str, published_cell: str,
            kind: str | None, reproduced: Stat | None, ours_cell: str, difference: float | None, note: str,
            status: str, result: PublishedResult | None = None) -> None:
        convention = our_convention(kind, reproduced) if kind else EPOCH_LABELS[best_kind]
        rows.append([Cell(display_name(label, settings)), Cell(network), Cell(dataset), Cell(pair),
                     Cell(published_convention), Cell(published_cell), Cell(convention), Cell(ours_cell),
                     Cell(f"{difference:+.2f}" if difference is not None else "—"), Cell(note)])
        numeric.append({"label": label, "network": network, "dataset": dataset, "pair": pair,
                        "published_convention": published_convention,
                        "published_epoch": result.source.convention.epoch if result else None,
                        "published_top1": result.top1 if result else None,
                        "published_std": result.std if result else None,
                        "published_seeds": result.source.convention.seeds if result else None,
                        "our_convention": convention, "our_epoch_kind": kind,
                        "reproduced_top1": reproduced.mean if reproduced else None,
                        "reproduced_std": reproduced.as_dict()["std"] if reproduced else None,
                        "reproduced_seeds": reproduced.n if reproduced else 0,
                        "difference": difference, "status": status, "source": note})

    def ours_text(stat: Stat | None) -> str:
        return f"{format_stat(stat, 2)} (n={stat.n})" if stat else NO_RUN

    matched = [result for result in published.results if result.matches(setup)]
    covered: set[tuple[str, str]] = set()
    for result in matched:
        convention = result.source.convention
        covered.add((result.run, result.network))
        kind = convention.our_kind(selection)
        has_run = result.run in labels and result.network in aggregate.networks(result.run)
        if kind is None:
            # Never beside a best epoch selected another way; the number is not even looked up.
            add(result.run, result.network, result.dataset, result.pair, convention.description,
                result.published_text(), None, None, NOT_COMPARABLE_TEXT if has_run else NO_RUN, None,
                result.source.citation, NOT_COMPARABLE if has_run else NO_RUN, result)
            continue
        ours = _ours(aggregate, result.run, result.network, f"top1_{kind}")
        note = result.source.citation
        if ours and ours.n != convention.seeds:
            note += f"; ours: {ours.n} seed(s), the paper: {convention.seeds}"
        if ours and kind == "last" and selection == "val":
            note += "; ours held a validation split out of the training set, the paper trained on all of it"
        add(result.run, result.network, result.dataset, result.pair, convention.description,
            result.published_text(), kind, ours, ours_text(ours), ours.mean - result.top1 if ours else None, note,
            "compared" if ours else NO_RUN, result)

    no_number = f"no published number for {setup.dataset}, {setup.pair}"
    for label in labels:
        if label in published.not_published:
            continue
        for network in _networks(aggregate, label):
            if (label, network) not in covered:
                ours = _ours(aggregate, label, network, f"top1_{best_kind}")
                add(label, network, setup.dataset, setup.pair, "—", no_number, best_kind, ours, ours_text(ours),
                    None, "", no_number)

    for label in ordered(list(published.not_published), settings):
        reason = published.not_published[label]
        networks = _networks(aggregate, label) if label in labels else ["student"]
        for network in networks:
            ours = _ours(aggregate, label, network, f"top1_{best_kind}")
            add(label, network, setup.dataset, setup.pair, "—", f"{NOT_PUBLISHED} ({reason.note})", best_kind, ours,
                ours_text(ours), None, reason.citation, NOT_PUBLISHED)

    table = Table("paper_vs_reproduced", "Paper vs reproduced (top-1 %, test)", "", COLUMNS, rows,
                  pd.DataFrame(numeric), align="lllllrlrrl")
    if matched:
        statuses = [row["status"] for row in numeric]
        statement = (f"Published numbers for {setup.describe()} are set beside ours measured the same way: a "
                     f"paper's best epoch (chosen on test) beside our best epoch selected on test, a last epoch "
                     f"beside our last; Δ = ours − paper. {statuses.count('compared')} compared, "
                     f"{statuses.count(NOT_COMPARABLE)} not comparable")
        statement += (" (our runs select their best epoch on validation; rerun with dataset.val_fraction=0 for "
                      "the paper protocol)." if statuses.count(NOT_COMPARABLE) else ".")
        reference = None
    else:
        datasets = ", ".join(sorted({result.dataset for result in published.results}))
        statement = (f"No published number exists for this dataset/pair ({setup.describe()}): the papers report "
                     f"{datasets}. Nothing here is compared with a paper; the reference table "
                     f"(tables/paper_reference.*) lists what would be compared on {settings.reference_dataset} for "
                     f"the methods run here.")
        reference = _reference_table(published, labels, settings)
    table.caption = statement + " Methods whose papers' numbers were not available say \"not published\"."
    return PaperComparison(statement, table, reference)


def _networks(aggregate: Aggregate, label: str) -> list[str]:
    """The label's networks, without a frozen pre-trained teacher (the teacher row reports it)."""
    return [network for network in aggregate.networks(label) if not aggregate.is_frozen_teacher(label, network)]


def _ours(aggregate: Aggregate, label: str, network: str, quantity: str) -> Stat | None:
    return aggregate.stat(label, network, quantity) if network in aggregate.networks(label) else None


def _reference_table(published: Published, labels: list[str], settings: AnalysisConfig) -> Table:
    rows, numeric = [], []
    for label in labels:
        for result in published.results:
            if result.run == label and result.dataset == settings.reference_dataset:
                rows.append([Cell(display_name(label, settings)), Cell(result.network), Cell(result.pair),
                             Cell(result.source.convention.description), Cell(result.published_text()),
                             Cell(result.source.citation)])
                numeric.append({"label": label, "network": result.network, "dataset": result.dataset,
                                "teacher": result.teacher, "student": result.student,
                                "convention": result.source.convention.description,
                                "published_top1": result.top1, "published_std": result.std,
                                "published_seeds": result.source.convention.seeds,
                                "source": result.source.citation})
    caption = (f"Reference only, not compared: the published {settings.reference_dataset} numbers for the methods "
               f"run here. Reproducing them needs dataset.name={settings.reference_dataset} and the paper's pair "
               f"(configs/papers/).")
    return Table("paper_reference", f"Published {settings.reference_dataset} numbers (reference, not compared)",
                 caption, ["Method", "Network", "Pair", "Convention", "Published", "Source"], rows,
                 pd.DataFrame(numeric), align="llllrl")
