"""Classification and calibration metrics: the one implementation that training and analysis share.

Accuracies are percentages (as papers report them); ECE, MCE and Brier are fractions. Calibration
uses the top-label confidence and 15 equal-width bins ``(lo, hi]``; a confidence of exactly 1.0 falls
in the last bin (Guo et al. 2017 binning, with the closed upper edge made explicit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_BINS = 15
# The bracket at least halves each step (bisection), so about 40 steps reach 1e-8 relative from [0.01, 100].
TEMPERATURE_MAX_STEPS = 100


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics of a reliability diagram; empty bins have count 0 and NaN means."""

    edges: Tensor  # [n_bins + 1]
    counts: Tensor  # [n_bins] samples per bin
    confidence: Tensor  # [n_bins] mean top-label confidence per bin
    accuracy: Tensor  # [n_bins] fraction correct per bin

    @property
    def gaps(self) -> Tensor:
        return (self.confidence - self.accuracy).abs()

    def expected_error(self) -> float:
        return float(self.expected_error_tensor())

    def max_error(self) -> float:
        return float(self.max_error_tensor())

    def expected_error_tensor(self) -> Tensor:
        weights = self.counts / self.counts.sum().clamp(min=1)
        return torch.nansum(weights * self.gaps)

    def max_error_tensor(self) -> Tensor:
        return torch.where(self.counts > 0, self.gaps, 0.0).max()  # gaps are >= 0; 0 when every bin is empty


def top_label(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Top-label confidence and correctness (as float) per sample."""
    probs = F.softmax(logits.float(), dim=1)
    confidence, prediction = probs.max(dim=1)
    return confidence, (prediction == labels).float()


def equal_width_bin_index(confidence: Tensor, n_bins: int) -> Tensor:
    """Bin ``k`` holds ``(k/n, (k+1)/n]``; confidence 1.0 lands in bin ``n - 1``."""
    return (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)


def reliability_bins(logits: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS) -> ReliabilityBins:
    confidence, correct = top_label(logits, labels)
    return _bins_from(confidence, correct, equal_width_bin_index(confidence, n_bins), n_bins,
                      torch.linspace(0, 1, n_bins + 1, device=confidence.device))


def adaptive_reliability_bins(logits: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS) -> ReliabilityBins:
    """Equal-mass bins: the sorted confidences split into ``n_bins`` groups of (nearly) equal size;
    each bin's upper edge is the largest confidence it holds."""
    confidence, correct = top_label(logits, labels)
    order = torch.argsort(confidence)
    index = torch.empty_like(order)
    index[order] = torch.arange(len(order), device=confidence.device) * n_bins // max(len(order), 1)
    upper = confidence.new_full((n_bins,), torch.nan).scatter_reduce(0, index, confidence, "amax", include_self=False)
    return _bins_from(confidence, correct, index, n_bins, torch.cat([confidence.new_zeros(1), upper]))


def _bins_from(confidence: Tensor, correct: Tensor, index: Tensor, n_bins: int, edges: Tensor) -> ReliabilityBins:
    counts = confidence.new_zeros(n_bins).index_add_(0, index, torch.ones_like(confidence))
    conf_sum = confidence.new_zeros(n_bins).index_add_(0, index, confidence)
    correct_sum = confidence.new_zeros(n_bins).index_add_(0, index, correct)
    safe = counts.clamp(min=1)
    empty = counts == 0
    return ReliabilityBins(edges=edges,
                           counts=counts,
                           confidence=torch.where(empty, torch.nan, conf_sum / safe),
                           accuracy=torch.where(empty, torch.nan, correct_sum / safe))


def expected_calibration_error(logits: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS) -> float:
    """ECE as a fraction in [0, 1]: the count-weighted mean |confidence − accuracy| over bins."""
    return reliability_bins(logits, labels, n_bins).expected_error()


def max_calibration_error(logits: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS) -> float:
    return reliability_bins(logits, labels, n_bins).max_error()


def adaptive_calibration_error(logits: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS) -> float:
    """ECE over equal-mass bins (less sensitive to the many nearly-empty high-confidence bins)."""
    return adaptive_reliability_bins(logits, labels, n_bins).expected_error()


def topk_accuracy(logits: Tensor, labels: Tensor, k: int) -> float:
    return float(topk_accuracy_tensor(logits, labels, k))


def topk_accuracy_tensor(logits: Tensor, labels: Tensor, k: int) -> Tensor:
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return 100.0 * hits.double().mean()


def negative_log_likelihood(logits: Tensor, labels: Tensor) -> float:
    return float(F.cross_entropy(logits.float(), labels))


def brier_score(logits: Tensor, labels: Tensor) -> float:
    return float(brier_score_tensor(logits, labels))


def brier_score_tensor(logits: Tensor, labels: Tensor) -> Tensor:
    """Multi-class Brier score: mean over samples of ``Σ_c (p_c − 1[c = y])²`` (range [0, 2])."""
    probs = F.softmax(logits.float(), dim=1)
    # A scatter, not F.one_hot, which checks the labels' range on the host (a sync on a GPU).
    one_hot = torch.zeros_like(probs).scatter_(1, labels[:, None], 1.0)
    return ((probs - one_hot) ** 2).sum(dim=1).mean()


def classification_metric_tensors(logits: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS) -> dict[str, Tensor]:
    """Every per-network number the suite reports, from one set of logits, as 0-d tensors on the logits'
    device: nothing is read back to the host (training copies all of an epoch's at once)."""
    logits, labels = logits.detach().float(), labels.detach()
    bins = reliability_bins(logits, labels, n_bins)
    return {
        "top1": topk_accuracy_tensor(logits, labels, 1),
        "top5": topk_accuracy_tensor(logits, labels, 5),
        "nll": F.cross_entropy(logits, labels),
        "ece": bins.expected_error_tensor(),
        "mce": bins.max_error_tensor(),
        "brier": brier_score_tensor(logits, labels),
    }


def classification_metrics(logits: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS) -> dict[str, float]:
    """``classification_metric_tensors`` computed on the CPU, as floats."""
    values = classification_metric_tensors(logits.detach().float().cpu(), labels.detach().cpu(), n_bins)
    return dict(zip(values, torch.stack([value.double() for value in values.values()]).tolist()))


def fit_temperature(logits: Tensor, labels: Tensor, lowest: float = 0.01, highest: float = 100.0,
                    tolerance: float = 1e-8) -> float:
    """Temperature scaling (Guo et al. 2017): the T in [lowest, highest] minimising the NLL of ``logits / T``.
    Fit it on a validation split, never on the test set.

    In β = 1/T the NLL, mean(logsumexp(β·z) − β·z_label), is convex: its slope, the mean of E_p[z] − z_label
    under p = softmax(β·z), grows with β (the slope's own derivative is the variance of z under p). So the
    minimum over [1/highest, 1/lowest] is the root of the slope, or exactly the end it points to (a bound
    is returned as given, so a caller can test ``T == lowest``). Newton steps kept inside a shrinking bracket
    (bisection when a step leaves it), in float64, until a step moves β by at most ``tolerance`` · β: the
    same answer on every CPU, far below the tolerance (LBFGS in float32 stopped wherever the SIMD width of
    its reductions let it, 1e-3 apart)."""
    if not 0 < lowest < highest:
        raise ValueError(f"temperature bounds must satisfy 0 < lowest < highest, got {lowest}, {highest}")
    scores = logits.detach().cpu().double()
    label_scores = scores.gather(1, labels.detach().cpu().long()[:, None]).squeeze(1)

    def slope_and_curvature(beta: float) -> tuple[float, float]:
        probs = torch.softmax(beta * scores, dim=1)
        mean = (probs * scores).sum(dim=1)
        variance = (probs * (scores - mean[:, None]) ** 2).sum(dim=1)
        return float((mean - label_scores).mean()), float(variance.mean())

    low, high = 1 / highest, 1 / lowest  # the bracket in β
    if slope_and_curvature(low)[0] >= 0:
        return highest  # the NLL rises from the smallest β on: the optimum is at (or beyond) the highest T
    if slope_and_curvature(high)[0] <= 0:
        return lowest  # it still falls at the largest β (e.g. no errors at all: T -> 0)
    beta = min(max(1.0, low), high)
    for _ in range(TEMPERATURE_MAX_STEPS):
        slope, curvature = slope_and_curvature(beta)
        if slope == 0:
            return 1 / beta
        low, high = (low, beta) if slope > 0 else (beta, high)
        candidate = beta - slope / curvature if curvature > 0 else math.nan
        if not low < candidate < high:
            candidate = (low + high) / 2
        if abs(candidate - beta) <= tolerance * candidate:
            return 1 / candidate
        beta = candidate
    raise ArithmeticError(f"the temperature fit did not converge in {TEMPERATURE_MAX_STEPS} steps (β = {beta})")


def temperature_scaled(logits: Tensor, temperature: float) -> Tensor:
    """``logits / T`` for a temperature from ``fit_temperature``. The argmax, hence accuracy, is unchanged."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return logits.detach().float().cpu() / temperature


def calibration_metrics(logits: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS) -> dict[str, float]:
    """The calibration numbers the analysis reports (ECE, MCE, adaptive ECE, NLL, Brier), from one set of logits."""
    logits, labels = logits.detach().float().cpu(), labels.detach().cpu()
    bins = reliability_bins(logits, labels, n_bins)
    return {
        "ece": bins.expected_error(),
        "mce": bins.max_error(),
        "adaptive_ece": adaptive_calibration_error(logits, labels, n_bins),
        "nll": negative_log_likelihood(logits, labels),
        "brier": brier_score(logits, labels),
    }
