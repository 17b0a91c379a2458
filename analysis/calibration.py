"""Calibration of every evaluated network of every run, at its best epoch, before and after temperature
scaling.

Temperature scaling needs a validation split: T is fitted on the validation logits of the best epoch
(never on test) and applied to the test logits of the same epoch. Runs of the paper protocol
(``selection: "test"``) have no validation split, so for them TS is not available (never fitted on test).

Bounded temperature. T minimises the validation NLL of ``logits / T`` over [T_MIN, T_MAX]. That NLL is
convex in β = 1/T, so ``reproduce.metrics.fit_temperature`` solves it exactly (Newton in β inside a
bracket, to 1e-8): an interior optimum is the same on every CPU, and a fit whose NLL still falls at a bound
returns that bound itself, so "at a bound" is an exact test, not a tolerance. The bounds: the temperatures
reported for image classifiers are of order one (over-confident networks a few units, under-confident ones
somewhat below 1); a factor of ten either way is far outside all of them. A fit at a bound means the
validation NLL has no interior minimum in the range rather than that the network is that miscalibrated: a
validation split without errors drives T -> 0 (every sharpening lowers its NLL; unbounded this gave
T = 0.023 and a ten-fold test NLL). Such fits become warnings in the report and are left out of the mean
temperature (tables, captions), which averages interior fits only; the TS columns still use them (the
bounded optimum is what bounded temperature scaling applies).

Sparse bins. A reliability bin holding a handful of the predictions has an accuracy of 0 or 1 from one
error more or less; bins with fewer than MIN_BIN_COUNT predictions are drawn as outlines (analysis/figures.py)
and left out of the MCE the report shows (``supported_max_error``), while ECE weights every bin by its
share anyway.

ECE convention (everywhere: tables, summary, figures). A method's ECE is the mean over seeds of each
seed's ECE, in percent. The reliability diagrams draw the bins of the seeds' test predictions pooled
(the picture), but the ECE printed on them is that same mean over seeds, so diagram and table agree.

predictions.pt is loaded with ``weights_only=True``: a crafted or corrupt file is refused and becomes a
note naming it, never code execution and never a crash.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from analysis.runs import Run
from reproduce.metrics import (
    DEFAULT_BINS,
    ReliabilityBins,
    calibration_metrics,
    fit_temperature,
    reliability_bins,
    temperature_scaled,
)

# metrics.json and predictions.pt come from the same evaluation; a larger disagreement means a stale file.
CONSISTENCY_TOLERANCE = 1e-4
T_MIN, T_MAX = 0.1, 10.0
MIN_BIN_COUNT = 10  # predictions a reliability bin needs to be drawn filled and to count for MCE


@dataclass(frozen=True)
class NetworkCalibration:
    label: str
    seed: int
    network: str
    epoch_kind: str  # the run's best kind: the epoch of these logits
    test: dict[str, float]  # calibration_metrics of the best-epoch test logits
    bins: ReliabilityBins
    # Temperature scaling; None where it is not available (no validation split, or its fit failed).
    temperature: float | None = None
    at_bound: bool = False  # T is T_MIN or T_MAX: the validation NLL has no interior minimum in the range
    val_errors: int | None = None  # misclassified validation images at the best epoch
    test_scaled: dict[str, float] | None = None
    bins_scaled: ReliabilityBins | None = None


def calibrate_run(run: Run, n_bins: int, notes: list[str], warnings: list[str]) -> list[NetworkCalibration]:
    """``notes``: problems with the input files; ``warnings``: temperature fits the report must qualify."""
    if not run.predictions_path.exists():
        return []
    where = f"{run.predictions_path}"
    try:
        predictions = torch.load(run.predictions_path, map_location="cpu", weights_only=True)
        labels, best = predictions["labels"], predictions["best"]
        if not isinstance(labels, dict) or not isinstance(best, dict):
            raise TypeError("'labels' and 'best' must be mappings of split -> tensors")
    except Exception as error:  # noqa: BLE001  (any unreadable or refused file becomes a note, not a crash)
        notes.append(f"{where} is unreadable or not a plain tensor file ({type(error).__name__}: "
                     f"{_first_line(error)}): left out of temperature scaling and the reliability diagrams")
        return []
    recorded_selection = predictions.get("selection", "val")
    if recorded_selection != run.selection:
        notes.append(f"{where} was written with selection {recorded_selection!r}, metrics.json says "
                     f"{run.selection!r} (stale file?): left out of temperature scaling and the reliability diagrams")
        return []
    if not _split_ok(best, labels, "test"):
        notes.append(f"{where} has no usable test logits and labels: left out of the reliability diagrams")
        return []
    has_val = run.selection == "val" and _split_ok(best, labels, "val")
    if run.selection == "val" and not has_val:
        notes.append(f"{where} has no usable validation logits: no temperature scaling for this run "
                     f"(it is never fitted on test)")
    results = []
    for network in run.networks:
        if not _logits_ok(best["test"].get(network), labels["test"]) or (
                has_val and not _logits_ok(best["val"].get(network), labels["val"])):
            notes.append(f"{where} lacks usable {network} logits: left out of temperature scaling and the "
                         f"reliability diagrams")
            continue
        results.append(_calibrate_network(run, network, best, labels, n_bins, has_val, notes, warnings))
    return results


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else ""


def _split_ok(best: dict[str, Any], labels: dict[str, Any], split: str) -> bool:
    return isinstance(best.get(split), dict) and isinstance(labels.get(split), torch.Tensor) \
        and labels[split].ndim == 1 and len(labels[split]) > 0


def _logits_ok(logits: Any, labels: torch.Tensor) -> bool:
    return isinstance(logits, torch.Tensor) and logits.ndim == 2 and len(logits) == len(labels) \
        and bool(torch.isfinite(logits).all())


def bounded_temperature(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, bool]:
    """(T minimising the NLL over [T_MIN, T_MAX], whether it is a bound): the fit returns a bound exactly."""
    temperature = fit_temperature(logits, labels, lowest=T_MIN, highest=T_MAX)
    return temperature, temperature in (T_MIN, T_MAX)


def supported_max_error(bins: ReliabilityBins, min_count: int = MIN_BIN_COUNT) -> float:
    """MCE over the bins holding at least ``min_count`` predictions (NaN when none does): one error in a bin
    of three predictions is a 33-point gap that says nothing about the network."""
    supported = bins.counts >= min_count
    return float(bins.gaps[supported].max()) if bool(supported.any()) else math.nan


def _calibrate_network(run: Run, network: str, best: dict[str, Any], labels: dict[str, torch.Tensor], n_bins: int,
                       has_val: bool, notes: list[str], warnings: list[str]) -> NetworkCalibration:
    test_logits, test_labels = best["test"][network].float(), labels["test"]
    before = calibration_metrics(test_logits, test_labels, n_bins)
    recorded = run.test_metrics(run.best_kind, network).get("ece")
    if n_bins == DEFAULT_BINS and recorded is not None and abs(recorded - before["ece"]) > CONSISTENCY_TOLERANCE:
        notes.append(f"{run.predictions_path} gives {network} test ECE {100 * before['ece']:.2f} % but metrics.json "
                     f"records {100 * recorded:.2f} %: the two files come from different runs (stale file?)")
    result = NetworkCalibration(run.label, run.seed, network, run.best_kind, before,
                                reliability_bins(test_logits, test_labels, n_bins))
    if not has_val:
        return result
    val_logits, val_labels = best["val"][network].float(), labels["val"]
    val_errors = int((val_logits.argmax(dim=1) != val_labels).sum())
    try:
        temperature, at_bound = bounded_temperature(val_logits, val_labels)
    except ArithmeticError as error:
        warnings.append(f"{run.path} {network}: {error}: no temperature scaling for this network")
        return result
    where = f"{run.path} {network}"
    if val_errors == 0:
        # Every margin is positive, so the NLL falls strictly as T falls: the fit returns T_MIN.
        warnings.append(f"{where}: the validation split has no errors at the best epoch, so its NLL has no "
                        f"interior minimum (it falls as T -> 0): T is the lower bound {temperature:g}, the TS "
                        f"numbers are not a calibration, and T is left out of the mean temperature")
    elif at_bound:
        direction = "T -> 0" if temperature == T_MIN else "larger T"
        warnings.append(f"{where}: the temperature fit reached the bound T = {temperature:g} (the validation NLL "
                        f"still falls towards {direction}; range [{T_MIN:g}, {T_MAX:g}]): read the TS numbers with "
                        f"care; T is left out of the mean temperature")
    scaled = temperature_scaled(test_logits, temperature)
    return NetworkCalibration(run.label, run.seed, network, run.best_kind, before, result.bins,
                              temperature=temperature, at_bound=at_bound,
                              val_errors=val_errors, test_scaled=calibration_metrics(scaled, test_labels, n_bins),
                              bins_scaled=reliability_bins(scaled, test_labels, n_bins))


def pool_bins(bins: list[ReliabilityBins]) -> ReliabilityBins:
    """Reliability bins of the seeds' test predictions taken together (equal-width bins share edges): what
    the diagrams draw. Their ECE label is the mean over seeds instead (module docstring)."""
    counts = torch.stack([b.counts for b in bins]).sum(dim=0)
    confidence_sum = torch.stack([torch.nan_to_num(b.confidence) * b.counts for b in bins]).sum(dim=0)
    correct_sum = torch.stack([torch.nan_to_num(b.accuracy) * b.counts for b in bins]).sum(dim=0)
    empty = counts == 0
    safe = counts.clamp(min=1)
    return ReliabilityBins(edges=bins[0].edges, counts=counts,
                           confidence=torch.where(empty, torch.nan, confidence_sum / safe),
                           accuracy=torch.where(empty, torch.nan, correct_sum / safe))
