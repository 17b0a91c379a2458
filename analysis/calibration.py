"""Calibration of every evaluated network of every run, before and after temperature scaling.

The temperature is fitted on the validation logits of the best epoch (never on test) and applied
to the test logits of the same epoch; the best epoch is the one the run chose on validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from analysis.runs import Run
from reproduce.metrics import (
    ReliabilityBins,
    calibration_metrics,
    fit_temperature,
    reliability_bins,
    temperature_scaled,
)

# metrics.json and predictions.pt come from the same evaluation; a larger disagreement means a stale file.
CONSISTENCY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class NetworkCalibration:
    label: str
    seed: int
    network: str
    temperature: float
    test: dict[str, float]  # calibration_metrics of the best-epoch test logits
    test_scaled: dict[str, float]  # the same after temperature scaling
    bins: ReliabilityBins
    bins_scaled: ReliabilityBins


def calibrate_run(run: Run, n_bins: int, notes: list[str]) -> list[NetworkCalibration]:
    if not run.predictions_path.exists():
        return []
    try:
        predictions = torch.load(run.predictions_path, map_location="cpu", weights_only=False)
        labels = predictions["labels"]
        best = predictions["best"]
    except Exception as error:  # noqa: BLE001  (any unreadable file becomes a note, not a crash)
        notes.append(f"{run.path}: predictions.pt is unreadable ({type(error).__name__}: {error}): "
                     f"no temperature scaling or reliability diagram for this run")
        return []
    if "val" not in best or "val" not in labels:
        notes.append(f"{run.path}: predictions.pt has no validation logits: temperature scaling needs them "
                     f"(it is never fitted on test)")
        return []
    results = []
    for network in run.networks:
        if network not in best["test"] or network not in best["val"]:
            notes.append(f"{run.path}: predictions.pt lacks {network} logits")
            continue
        results.append(_calibrate_network(run, network, best, labels, n_bins, notes))
    return results


def _calibrate_network(run: Run, network: str, best: dict[str, Any], labels: dict[str, torch.Tensor],
                       n_bins: int, notes: list[str]) -> NetworkCalibration:
    test_logits, test_labels = best["test"][network], labels["test"]
    temperature = fit_temperature(best["val"][network], labels["val"])
    scaled = temperature_scaled(test_logits, temperature)
    before = calibration_metrics(test_logits, test_labels, n_bins)
    recorded = run.test_metrics("best", network).get("ece")
    if recorded is not None and abs(recorded - before["ece"]) > CONSISTENCY_TOLERANCE:
        notes.append(f"{run.path}: predictions.pt gives {network} test ECE {before['ece']:.4f} but metrics.json "
                     f"records {recorded:.4f}: the two files come from different runs (stale file?)")
    return NetworkCalibration(run.label, run.seed, network, temperature, before,
                              calibration_metrics(scaled, test_labels, n_bins),
                              reliability_bins(test_logits, test_labels, n_bins),
                              reliability_bins(scaled, test_labels, n_bins))


def pool_bins(bins: list[ReliabilityBins]) -> ReliabilityBins:
    """Reliability bins of the seeds' test predictions taken together (equal-width bins share edges)."""
    counts = torch.stack([b.counts for b in bins]).sum(dim=0)
    confidence_sum = torch.stack([torch.nan_to_num(b.confidence) * b.counts for b in bins]).sum(dim=0)
    correct_sum = torch.stack([torch.nan_to_num(b.accuracy) * b.counts for b in bins]).sum(dim=0)
    empty = counts == 0
    safe = counts.clamp(min=1)
    return ReliabilityBins(edges=bins[0].edges, counts=counts,
                           confidence=torch.where(empty, torch.nan, confidence_sum / safe),
                           accuracy=torch.where(empty, torch.nan, correct_sum / safe))
