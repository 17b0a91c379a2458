"""Paper vs reproduced: published top-1 beside ours, like with like only.

A published number is set against our runs only when the dataset, the teacher -> student pair and
the measurement convention all match (the convention picks our best or last epoch). Methods whose
papers gave no numbers say "not published"; when no published number exists for our dataset and pair
the table says so and lists, for reference only, what would be compared on the papers' main dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from analysis.aggregate import Aggregate, Stat
from analysis.runs import AnalysisError, Setup
from analysis.settings import AnalysisSettings
from analysis.tables import Cell, Table, format_stat

NO_RUN = "no run"
NOT_PUBLISHED = "not published"
RESULT_KEYS = {"source", "dataset", "run", "network", "teacher", "student", "top1", "std"}


@dataclass(frozen=True)
class Convention:
    epoch: str  # "best" (chosen on validation) or "last"
    seeds: int
    description: str


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


COLUMNS = ["Method", "Network", "Dataset", "Pair", "Convention", "Published", "Reproduced", "Δ (ours − paper)",
           "Source / note"]


def paper_vs_reproduced(published: Published, aggregate: Aggregate, setup: Setup, labels: list[str],
                        settings: AnalysisSettings) -> PaperComparison:
    rows: list[list[Cell]] = []
    numeric: list[dict[str, Any]] = []

    def add(label: str, network: str, dataset: str, pair: str, convention: str, published_cell: str,
            reproduced: Stat | None, difference: float | None, note: str, status: str,
            result: PublishedResult | None = None) -> None:
        reproduced_cell = format_stat(reproduced, 2) + f" (n={reproduced.n})" if reproduced else NO_RUN
        rows.append([Cell(settings.display_name(label)), Cell(network), Cell(dataset), Cell(pair), Cell(convention),
                     Cell(published_cell), Cell(reproduced_cell),
                     Cell(f"{difference:+.2f}" if difference is not None else "—"), Cell(note)])
        numeric.append({"label": label, "network": network, "dataset": dataset, "pair": pair, "convention": convention,
                        "published_top1": result.top1 if result else None,
                        "published_std": result.std if result else None,
                        "published_seeds": result.source.convention.seeds if result else None,
                        "reproduced_top1": reproduced.mean if reproduced else None,
                        "reproduced_std": reproduced.as_dict()["std"] if reproduced else None,
                        "reproduced_seeds": reproduced.n if reproduced else 0,
                        "difference": difference, "status": status, "source": note})

    matched = [result for result in published.results if result.matches(setup)]
    covered: set[tuple[str, str]] = set()
    for result in matched:
        ours = _ours(aggregate, result.run, result.network, f"top1_{result.source.convention.epoch}")
        covered.add((result.run, result.network))
        note = result.source.citation
        if ours and ours.n != result.source.convention.seeds:
            note += f"; ours: {ours.n} seed(s), the paper: {result.source.convention.seeds}"
        add(result.run, result.network, result.dataset, result.pair, result.source.convention.description,
            result.published_text(), ours, ours.mean - result.top1 if ours else None, note,
            "compared" if ours else NO_RUN, result)

    no_number = f"no published number for {setup.dataset}, {setup.pair}"
    for label in labels:
        if label in published.not_published:
            continue
        for network in aggregate.networks(label):
            if (label, network) not in covered:
                add(label, network, setup.dataset, setup.pair, "best epoch (ours)", no_number,
                    _ours(aggregate, label, network, "top1_best"), None, "", no_number)

    for label in settings.ordered(list(published.not_published)):
        reason = published.not_published[label]
        networks = aggregate.networks(label) if label in labels else ["student"]
        for network in networks:
            ours = _ours(aggregate, label, network, "top1_best")
            add(label, network, setup.dataset, setup.pair, "best epoch (ours)", f"{NOT_PUBLISHED} ({reason.note})",
                ours, None, reason.citation, NOT_PUBLISHED)

    table = Table("paper_vs_reproduced", "Paper vs reproduced (top-1 %, test)", "", COLUMNS, rows,
                  pd.DataFrame(numeric), align="lllllrrrl")
    if matched:
        statement = (f"Published numbers for {setup.describe()} are set beside ours at the paper's convention "
                     f"(best or last epoch); Δ = ours − paper.")
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


def _ours(aggregate: Aggregate, label: str, network: str, quantity: str) -> Stat | None:
    return aggregate.stat(label, network, quantity) if network in aggregate.networks(label) else None


def _reference_table(published: Published, labels: list[str], settings: AnalysisSettings) -> Table:
    rows, numeric = [], []
    for label in labels:
        for result in published.results:
            if result.run == label and result.dataset == settings.reference_dataset:
                rows.append([Cell(settings.display_name(label)), Cell(result.network), Cell(result.pair),
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
