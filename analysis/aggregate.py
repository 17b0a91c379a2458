"""Per-run numbers in one long table, and their mean ± std over seeds.

One record per (run label, seed, network). Its quantities are named ``<metric>_<epoch>``:
``top1_best``, ``ece_last``... from metrics.json (test split; the best epoch is the one chosen on
validation), ``adaptive_ece_best`` and ``<metric>_ts`` (after temperature scaling) plus
``temperature`` from the run's predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from analysis.calibration import NetworkCalibration
from analysis.runs import EPOCH_KINDS, RunSet

KEYS = ["label", "seed", "network"]


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (n − 1; NaN for one seed) over ``n`` seeds."""

    mean: float
    std: float
    n: int

    def as_dict(self) -> dict[str, float | int | None]:
        return {"mean": self.mean, "std": None if math.isnan(self.std) else self.std, "n": self.n}


def build_records(runset: RunSet, calibrations: list[NetworkCalibration]) -> pd.DataFrame:
    rows: dict[tuple[str, int, str], dict[str, float]] = {}
    for run in runset.runs:
        for network in run.networks:
            row = rows.setdefault((run.label, run.seed, network), {})
            for kind in EPOCH_KINDS:
                row.update({f"{metric}_{kind}": float(value)
                            for metric, value in run.test_metrics(kind, network).items()})
    for calibration in calibrations:
        row = rows.setdefault((calibration.label, calibration.seed, calibration.network), {})
        row["adaptive_ece_best"] = calibration.test["adaptive_ece"]
        row["temperature"] = calibration.temperature
        row.update({f"{metric}_ts": value for metric, value in calibration.test_scaled.items()})
    records = pd.DataFrame([{**dict(zip(KEYS, key)), **values} for key, values in rows.items()])
    return records if not records.empty else pd.DataFrame(columns=KEYS)


class Aggregate:
    """Look-ups of mean ± std over seeds in the per-run records."""

    def __init__(self, records: pd.DataFrame) -> None:
        self.records = records

    def networks(self, label: str) -> list[str]:
        return sorted(set(self.records.loc[self.records["label"] == label, "network"]))

    def seeds(self, label: str) -> list[int]:
        return sorted(set(int(seed) for seed in self.records.loc[self.records["label"] == label, "seed"]))

    def stat(self, label: str, network: str, quantity: str) -> Stat | None:
        """None when no seed of ``label`` has ``quantity`` for ``network``."""
        if quantity not in self.records.columns:
            return None
        chosen = (self.records["label"] == label) & (self.records["network"] == network)
        values = self.records.loc[chosen, quantity].dropna().astype(float)
        if values.empty:
            return None
        return Stat(float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan, len(values))
