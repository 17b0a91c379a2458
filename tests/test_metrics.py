"""Calibration and classification metrics on hand-built cases whose values are known exactly."""

from __future__ import annotations

import math

import pytest
import torch

from reproduce.metrics import (
    adaptive_calibration_error,
    brier_score,
    calibration_metrics,
    classification_metrics,
    equal_width_bin_index,
    expected_calibration_error,
    fit_temperature,
    max_calibration_error,
    negative_log_likelihood,
    reliability_bins,
    temperature_scaled,
    top_label,
)


def logits_with_confidence(confidences: list[float], correct: list[bool], num_classes: int = 10
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax puts exactly ``c`` on class 0 and spreads ``1 − c`` over the others; the label
    is class 0 when the sample should be correct and class 1 otherwise."""
    rows = []
    for confidence in confidences:
        rest = (1.0 - confidence) / (num_classes - 1)
        assert confidence > rest, "class 0 must be the top label"
        rows.append([math.log(confidence)] + [math.log(rest)] * (num_classes - 1))
    labels = torch.tensor([0 if hit else 1 for hit in correct])
    return torch.tensor(rows, dtype=torch.float64), labels


def test_perfectly_calibrated_set_has_zero_ece() -> None:
    # In every bin the fraction correct equals the confidence: 3/10 at 0.3, 5/10 at 0.5, ... 9/10 at 0.9.
    confidences, correct = [], []
    for confidence in (0.3, 0.5, 0.6, 0.8, 0.9):
        hits = round(confidence * 10)
        confidences += [confidence] * 10
        correct += [True] * hits + [False] * (10 - hits)
    logits, labels = logits_with_confidence(confidences, correct)
    assert expected_calibration_error(logits, labels) == pytest.approx(0.0, abs=1e-6)
    assert max_calibration_error(logits, labels) == pytest.approx(0.0, abs=1e-6)
    bins = reliability_bins(logits, labels)
    assert int(bins.counts.sum()) == 50 and int((bins.counts > 0).sum()) == 5


def test_over_confident_set_has_the_known_errors() -> None:
    logits, labels = logits_with_confidence([0.9] * 10, [True] * 6 + [False] * 4, num_classes=2)
    assert expected_calibration_error(logits, labels) == pytest.approx(0.3, abs=1e-6)
    assert max_calibration_error(logits, labels) == pytest.approx(0.3, abs=1e-6)


def test_mce_is_the_largest_bin_gap_and_ece_the_weighted_mean() -> None:
    # Bin of 0.9 (10 samples, 6 correct: gap 0.3) and bin of 0.55 (10 samples, 5 correct: gap 0.05).
    correct = [True] * 6 + [False] * 4 + [True] * 5 + [False] * 5
    logits, labels = logits_with_confidence([0.9] * 10 + [0.55] * 10, correct, num_classes=2)
    assert max_calibration_error(logits, labels) == pytest.approx(0.3, abs=1e-6)
    assert expected_calibration_error(logits, labels) == pytest.approx(0.175, abs=1e-6)


def test_confidence_of_exactly_one_falls_in_the_last_bin() -> None:
    logits = torch.tensor([[100.0, 0.0]])
    confidence, _ = top_label(logits, torch.tensor([0]))
    assert float(confidence) == 1.0
    counts = reliability_bins(logits, torch.tensor([0])).counts
    assert counts[-1] == 1 and counts.sum() == 1
    assert equal_width_bin_index(torch.tensor([1.0]), 15).item() == 14


def test_confidence_on_a_bin_edge_falls_in_the_lower_bin() -> None:
    # Bins are (lo, hi]: k/15 is the upper edge of bin k − 1.
    edges = torch.arange(1, 16) / 15
    assert equal_width_bin_index(edges, 15).tolist() == list(range(15))
    assert equal_width_bin_index(edges + 1e-4, 15)[:-1].tolist() == list(range(1, 15))
    # Through the softmax: C equal logits give confidence 1/C; 1/3 = 5/15 -> bin 4, 1/5 = 3/15 -> bin 2.
    for classes, expected_bin in ((3, 4), (5, 2), (15, 0)):
        counts = reliability_bins(torch.zeros(1, classes), torch.tensor([0])).counts
        assert counts.nonzero().flatten().tolist() == [expected_bin]


def test_adaptive_ece_on_a_hand_built_case() -> None:
    # Two equal-mass bins of three samples each:
    #   low  {0.6, 0.7, 0.8}: mean confidence 0.7,     accuracy 2/3 -> gap 1/30
    #   high {0.9, 0.95, 0.99}: mean confidence 0.9467, accuracy 1  -> gap 0.16/3
    logits, labels = logits_with_confidence([0.9, 0.6, 0.99, 0.7, 0.95, 0.8], [True, True, True, False, True, True],
                                            num_classes=2)
    expected = 0.5 * (1 / 30) + 0.5 * (0.16 / 3)
    assert adaptive_calibration_error(logits, labels, n_bins=2) == pytest.approx(expected, abs=1e-6)
    # Equal-width bins put all six in (0.5, 1]: |mean confidence 0.8233 − accuracy 5/6| = 0.01.
    assert expected_calibration_error(logits, labels, n_bins=2) == pytest.approx(0.01, abs=1e-6)


def test_brier_and_nll_hand_computed() -> None:
    probabilities = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]], dtype=torch.float64)
    logits, labels = probabilities.log(), torch.tensor([0, 2])
    # (0.3² + 0.2² + 0.1²) = 0.14 and (0.5² + 0.25² + 0.75²) = 0.875
    assert brier_score(logits, labels) == pytest.approx((0.14 + 0.875) / 2, abs=1e-6)
    assert negative_log_likelihood(logits, labels) == pytest.approx(-(math.log(0.7) + math.log(0.25)) / 2, abs=1e-6)


def test_calibration_metrics_bundle_the_individual_functions() -> None:
    generator = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(300, 7, generator=generator) * 3, torch.randint(0, 7, (300,), generator=generator)
    bundle = calibration_metrics(logits, labels)
    assert bundle == pytest.approx({
        "ece": expected_calibration_error(logits, labels), "mce": max_calibration_error(logits, labels),
        "adaptive_ece": adaptive_calibration_error(logits, labels), "nll": negative_log_likelihood(logits, labels),
        "brier": brier_score(logits, labels)})
    assert classification_metrics(logits, labels)["ece"] == pytest.approx(bundle["ece"])


def test_temperature_scaling_recovers_a_known_temperature_and_lowers_nll() -> None:
    # A calibrated model by construction: labels are sampled from softmax(logits). Multiplying the
    # logits by 3 makes it over-confident; the fitted temperature must undo exactly that.
    generator = torch.Generator().manual_seed(0)
    calibrated = torch.randn(20000, 10, generator=generator) * 1.5
    labels = torch.multinomial(torch.softmax(calibrated, dim=1), 1, generator=generator).squeeze(1)
    over_confident = 3.0 * calibrated
    temperature = fit_temperature(over_confident, labels)
    assert temperature == pytest.approx(3.0, rel=0.05)
    scaled = temperature_scaled(over_confident, temperature)
    assert negative_log_likelihood(scaled, labels) < negative_log_likelihood(over_confident, labels) - 0.1
    assert expected_calibration_error(scaled, labels) < expected_calibration_error(over_confident, labels) / 3
    assert torch.equal(scaled.argmax(dim=1), over_confident.argmax(dim=1))


def test_temperature_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        temperature_scaled(torch.zeros(2, 3), 0.0)
