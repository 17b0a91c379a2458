"""The experiment's headline, the one metrics file DVC declares: ``dvclive/metrics.json``.

``dvc exp show`` lays out one column per number of every declared metrics file, and DVC has no setting
for a default selection; the table fits a terminal only if DVC sees a handful of numbers per method.
So the file holds, per method, the four numbers a reader compares (the analysis' means over seeds, from
reports/summary.json, named as it names them):

- ``top1_last``: test top-1 (%) at the last epoch;
- ``top1_best``: test top-1 (%) at the best epoch, chosen on validation (``top1_best_test_selected``
  under the papers' protocol, chosen on test);
- ``ece_best``: test ECE (%) at that epoch, before temperature scaling;
- ``vs_vanilla``: ``top1_best`` minus the vanilla student's, in points.

The teacher method lists its own network's top-1. Everything else (std over seeds, the online
methods' teachers, ECE after temperature scaling, the studies) is in the report, reports/summary.json
and ``dvclive/<method>/``.

``dvc exp show`` orders its columns as they appear in the workspace's file and, when the table is too
wide, folds columns from the right into ``…``. So inside ``dvc exp run`` (DVC names the baseline
commit in ``DVC_EXP_BASELINE_REV``) the methods whose coefficients the experiment changed come first:
after ``dvc exp run -S methods.kd.temperature=2``, the first columns are KD's, for the baseline and
the experiment alike. Outside an experiment the order is the report's. The order is the only thing the
baseline decides; the numbers are the same.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from reproduce.errors import UserError
from reproduce.io import atomic_write_text

HEADLINE_FILE = Path("dvclive/metrics.json")
SUMMARY_FILE = Path("reports/summary.json")
DIGITS = 2  # a digits test image is 0.19 points of top-1; more digits would be noise in `dvc exp show`


def headline(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per method, the four headline numbers of the analysis' summary, in its order."""
    kind = "best" if summary.get("selection", "val") == "val" else "best_test_selected"
    numbers = {}
    for method, row in summary["methods"].items():
        network = "student" if f"student_top1_{kind}" in row else "teacher"  # the teacher method's own network
        values = {"top1_last": row.get(f"{network}_top1_last"), f"top1_{kind}": row.get(f"{network}_top1_{kind}"),
                  f"ece_{kind}": row.get(f"{network}_ece_pct_{kind}"),
                  "vs_vanilla": row.get(f"{network}_top1_{kind}_vs_vanilla")}
        numbers[method] = {name: round(value, DIGITS) for name, value in values.items() if value is not None}
    return numbers


def changed_methods(methods: dict[str, Any], baseline: dict[str, Any] | None) -> list[str]:
    """The methods whose coefficients differ from the baseline's (none without a baseline)."""
    if baseline is None:
        return []
    return [name for name, coefficients in methods.items() if baseline.get(name) != coefficients]


def baseline_methods(params_path: Path) -> dict[str, Any] | None:
    """params.yaml's ``methods`` at the commit a running ``dvc exp run`` started from, or None outside one."""
    revision = os.environ.get("DVC_EXP_BASELINE_REV")
    if not revision:
        return None
    shown = subprocess.run(["git", "show", f"{revision}:{params_path.as_posix()}"], capture_output=True, text=True)
    if shown.returncode != 0:  # the baseline has no such file: nothing to compare with
        return None
    return (yaml.safe_load(shown.stdout) or {}).get("methods") or {}


def write_headline(summary_path: Path = SUMMARY_FILE, params_path: Path = Path("params.yaml"),
                   out_path: Path = HEADLINE_FILE) -> dict[str, dict[str, float]]:
    """dvclive/metrics.json from the analysis' summary, the experiment's changed methods first."""
    if not summary_path.exists():
        raise UserError(f"{summary_path}: missing; the analysis stage writes it (`dvc repro analysis`)")
    numbers = headline(json.loads(summary_path.read_text()))
    methods = (yaml.safe_load(params_path.read_text()) or {}).get("methods") or {}
    first = [name for name in changed_methods(methods, baseline_methods(params_path)) if name in numbers]
    ordered = {name: numbers[name] for name in first + [name for name in numbers if name not in first]}
    atomic_write_text(out_path, json.dumps(ordered, indent=1) + "\n")
    return ordered
