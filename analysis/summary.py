"""``reports/summary.json``: what `dvc metrics show` lists, a few headline numbers per method (means over
seeds). Every number behind the tables is in tables/*.csv; this file stays small on purpose, and only
``build_summary`` decides what is in it (the pipeline's DVC metrics may ask for a different selection).

Keys are named by epoch kind, so a number selected on test and one selected on validation never share a
key in `dvc metrics diff`.
"""

from __future__ import annotations

from typing import Any

from analysis.aggregate import Aggregate
from analysis.runs import EPOCH_LABELS, RunSet
from analysis.tables import VANILLA

UNITS = ("top1: %, test set; ece_pct: ECE in percent (15 equal-width bins), the mean over seeds of each seed's "
         "ECE; _vs_vanilla: difference to the vanilla student in percentage points; _ts: after temperature "
         "scaling; every value is the mean over the method's seeds")
SUMMARY_DIGITS = 4


def summary_metrics(aggregate: Aggregate, label: str, best_kind: str, has_validation: bool) -> dict[str, float]:
    """The headline numbers of one method."""
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
    best_kind = runset.best_kind
    methods = {label: {"seeds": len(aggregate.seeds(label)),
                       **summary_metrics(aggregate, label, best_kind, runset.has_validation)} for label in labels}
    setup = runset.setup
    return {"dataset": setup.dataset, "teacher": setup.teacher, "student": setup.student,
            "selection": runset.selection, "best_epoch": EPOCH_LABELS[best_kind], "units": UNITS,
            "input_notes": len(notes), "warnings": len(warnings), "methods": methods}
