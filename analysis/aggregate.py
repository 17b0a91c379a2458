"""Per-run numbers in one long table, their mean ± std over seeds, and differences between methods.

One record per (run label, seed, network). Its quantities are named ``<metric>_<epoch kind>`` (the kinds
of analysis/runs.py): ``top1_best`` (best epoch selected on validation), ``top1_best_test_selected``
(selected on test, the paper protocol), ``top1_last``..., from metrics.json (test split; fractions for
ece/mce/brier, as the engine writes them); ``adaptive_ece_<kind>`` from the run's predictions at its best
epoch, and ``mce_supported_<kind>`` (MCE over the bins with enough predictions, analysis/calibration.py);
and, with a validation split only, ``temperature_applied`` (every fit), ``temperature`` (interior fits
only: a fit at a bound is left out of the mean temperature), ``temperature_at_bound`` (1 or 0),
``<metric>_ts`` (after temperature scaling) and ``mce_supported_ts``.

Difference to the vanilla student: mean(method) − mean(vanilla) over seeds with a 95 % Welch t interval
(unequal variances, Welch–Satterthwaite degrees of freedom): the seeds of the two methods are treated as
independent samples. With one seed on either side there is no variance estimate, hence no interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
from scipy import stats

from analysis import registry
from analysis.calibration import NetworkCalibration, supported_max_error
from analysis.runs import RunSet

KEYS = ["label", "seed", "network"]
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (n − 1; NaN for one seed) over ``n`` seeds."""

    mean: float
    std: float
    n: int

    def as_dict(self) -> dict[str, float | int | None]:
        return {"mean": self.mean, "std": None if math.isnan(self.std) else self.std, "n": self.n}


@dataclass(frozen=True)
class Difference:
    """mean(a) − mean(b) with its Welch t interval at ``CONFIDENCE``; low/high are None when either side
    has a single seed."""

    estimate: float
    low: float | None
    high: float | None
    df: float | None
    n_a: int
    n_b: int

    def text(self, digits: int = 2) -> str:
        shown = f"{self.estimate:+.{digits}f}"
        if self.low is None or self.high is None:
            return f"{shown} (CI n/a: n=1)"
        return f"{shown} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def welch_difference(a: list[float], b: list[float], confidence: float = CONFIDENCE) -> Difference:
    n_a, n_b = len(a), len(b)
    if n_a == 0 or n_b == 0:
        raise ValueError("a difference needs at least one value on each side")
    mean_a, mean_b = sum(a) / n_a, sum(b) / n_b
    estimate = mean_a - mean_b
    if n_a < 2 or n_b < 2:
        return Difference(estimate, None, None, None, n_a, n_b)
    var_a = sum((x - mean_a) ** 2 for x in a) / (n_a - 1)
    var_b = sum((x - mean_b) ** 2 for x in b) / (n_b - 1)
    share_a, share_b = var_a / n_a, var_b / n_b
    se2 = share_a + share_b
    if se2 == 0:  # identical seeds on both sides: no spread to put an interval on
        return Difference(estimate, estimate, estimate, math.inf, n_a, n_b)
    df = se2 ** 2 / (share_a ** 2 / (n_a - 1) + share_b ** 2 / (n_b - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * math.sqrt(se2)
    return Difference(estimate, estimate - half, estimate + half, df, n_a, n_b)


def build_records(runset: RunSet, calibrations: list[NetworkCalibration]) -> pd.DataFrame:
    rows: dict[tuple[str, int, str], dict[str, float]] = {}
    for run in runset.runs:
        for network in run.networks:
            row = rows.setdefault((run.label, run.seed, network), {})
            for kind in run.epoch_kinds:
                row.update({f"{metric}_{kind}": float(value)
                            for metric, value in run.test_metrics(kind, network).items()
                            if isinstance(value, (int, float))})
    for calibration in calibrations:
        row = rows.setdefault((calibration.label, calibration.seed, calibration.network), {})
        row[f"adaptive_ece_{calibration.epoch_kind}"] = calibration.test["adaptive_ece"]
        row[f"diagram_ece_{calibration.epoch_kind}"] = calibration.test["ece"]
        row[f"mce_supported_{calibration.epoch_kind}"] = supported_max_error(calibration.bins)
        if calibration.temperature is not None and calibration.test_scaled is not None \
                and calibration.bins_scaled is not None:
            row["temperature_applied"] = calibration.temperature
            row["temperature"] = math.nan if calibration.at_bound else calibration.temperature
            row["temperature_at_bound"] = float(calibration.at_bound)
            row.update({f"{metric}_ts": value for metric, value in calibration.test_scaled.items()})
            row["mce_supported_ts"] = supported_max_error(calibration.bins_scaled)
    records = pd.DataFrame([{**dict(zip(KEYS, key)), **values} for key, values in rows.items()])
    return records if not records.empty else pd.DataFrame(columns=KEYS)


class Aggregate:
    """Look-ups of mean ± std over seeds in the per-run records.

    ``frozen_teachers``: the labels whose ``teacher`` network is the pre-trained teacher of the teacher run,
    reported once, in the teacher row; by default every label whose method uses the pre-trained teacher
    (the report removes a label whose teacher network turned out to differ from the teacher run's)."""

    def __init__(self, records: pd.DataFrame, frozen_teachers: frozenset[str] | None = None) -> None:
        self.records = records
        labels = set(records["label"]) if "label" in records.columns else set()
        self.frozen_teachers = frozen_teachers if frozen_teachers is not None else frozenset(
            label for label in labels if registry.has_frozen_teacher(label))

    def is_frozen_teacher(self, label: str, network: str) -> bool:
        return network == "teacher" and label in self.frozen_teachers

    def networks(self, label: str) -> list[str]:
        return sorted(set(self.records.loc[self.records["label"] == label, "network"]))

    def seeds(self, label: str) -> list[int]:
        return sorted(set(int(seed) for seed in self.records.loc[self.records["label"] == label, "seed"]))

    def values(self, label: str, network: str, quantity: str) -> list[float]:
        """The seeds' values, in seed order; seeds without the quantity are left out."""
        if quantity not in self.records.columns:
            return []
        chosen = (self.records["label"] == label) & (self.records["network"] == network)
        return [float(value) for value in self.records.loc[chosen].sort_values("seed")[quantity].dropna()]

    def stat(self, label: str, network: str, quantity: str) -> Stat | None:
        """None when no seed of ``label`` has ``quantity`` for ``network``."""
        values = pd.Series(self.values(label, network, quantity), dtype=float)
        if values.empty:
            return None
        return Stat(float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan, len(values))

    def difference(self, label: str, reference: str, network: str, quantity: str) -> Difference | None:
        """``label`` − ``reference`` on ``quantity`` of ``network``; None when either has no value."""
        a, b = self.values(label, network, quantity), self.values(reference, network, quantity)
        return welch_difference(a, b) if a and b else None
