"""The temperature fit of the analysis (reproduce.metrics.fit_temperature, bounded by analysis/calibration.py):
the convex 1-D problem in β = 1/T solved exactly, checked against closed forms, a zero slope at the optimum,
exact bounds, and the same answer whatever SIMD width torch's CPU kernels use."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from analysis.calibration import T_MAX, T_MIN, bounded_temperature
from reproduce.metrics import fit_temperature
from conftest import PROJECT


def two_class(right: int, wrong: int, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``right`` samples with logits (margin, 0) labelled 0, ``wrong`` ones labelled 1. NLL(β) =
    [right·log(1 + e^(−βm)) + wrong·log(1 + e^(βm))] / n, slope ∝ −right·σ(−βm) + wrong·σ(βm), zero where
    e^(βm) = right/wrong: T = m / ln(right/wrong)."""
    logits = torch.tensor([[margin, 0.0]] * (right + wrong))
    labels = torch.tensor([0] * right + [1] * wrong)
    return logits, labels


def nll_slope(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """d NLL / dβ at β = 1/T by autograd, in float64: an independent check of the solver's own slope."""
    beta = torch.tensor(1 / temperature, dtype=torch.float64, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(beta * logits.double(), labels)
    loss.backward()
    return float(beta.grad)


@pytest.mark.parametrize(("right", "wrong", "margin"), [
    (3, 1, 1.0),  # T = 1/ln 3 = 0.91024 (the case LBFGS missed by 1e-3)
    (9, 1, 2.0),  # T = 2/ln 9 = 0.91024 again, through a different margin
    (3, 1, 5 * math.log(3)),  # T = 5 exactly
    (2, 1, 0.15 * math.log(2)),  # T = 0.15, close to the lower bound
    (101, 100, 9.0),  # T = 9/ln(1.01) ≈ 904: beyond T_MAX, so the upper bound
])
def test_two_class_optimum_is_the_closed_form(right: int, wrong: int, margin: float) -> None:
    logits, labels = two_class(right, wrong, margin)
    expected = margin / math.log(right / wrong)
    temperature, at_bound = bounded_temperature(logits, labels)
    if expected > T_MAX:
        assert temperature == T_MAX and at_bound
        assert fit_temperature(logits, labels, lowest=T_MIN, highest=1e4) == pytest.approx(expected, rel=1e-7)
    else:
        assert temperature == pytest.approx(expected, rel=1e-7) and not at_bound


def test_the_slope_is_zero_and_the_nll_minimal_at_a_multi_class_optimum() -> None:
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 10, (2000,), generator=generator)
    logits = 4 * torch.randn(2000, 10, generator=generator) + 3 * torch.nn.functional.one_hot(labels, 10)
    temperature, at_bound = bounded_temperature(logits, labels)
    assert not at_bound and 1 < temperature < T_MAX  # over-confident by construction
    # Slope scale: the slope at T = 1, of order one; at the optimum it is ~1e-8 of that or less.
    assert abs(nll_slope(logits, labels, temperature)) < 1e-7 * abs(nll_slope(logits, labels, 1.0))

    def nll(t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits.double() / t, labels))

    assert nll(temperature) <= min(nll(temperature * (1 - 1e-4)), nll(temperature * (1 + 1e-4)))


def test_bounds_are_returned_exactly() -> None:
    right = torch.tensor([[3.0, 0.0], [0.0, 2.0], [4.0, 1.0]]), torch.tensor([0, 1, 0])  # no errors: T -> 0
    assert bounded_temperature(*right) == (T_MIN, True)
    uninformative = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1])  # optimum at β = 0: T = ∞
    assert bounded_temperature(*uninformative) == (T_MAX, True)
    assert fit_temperature(*uninformative, lowest=0.5, highest=2.0) == 2.0


def test_bad_bounds_are_refused() -> None:
    logits, labels = two_class(3, 1, 1.0)
    with pytest.raises(ValueError, match="0 < lowest < highest"):
        fit_temperature(logits, labels, lowest=2.0, highest=1.0)


CAPABILITY_PROBE = """
import json, numpy, torch
from reproduce.metrics import fit_temperature
# numpy draws the data: torch.randn itself differs between capabilities (its vectorised normal sampler).
rng = numpy.random.default_rng(0)
labels = torch.from_numpy(rng.integers(0, 100, 5000))
logits = torch.from_numpy(5 * rng.standard_normal((5000, 100), dtype=numpy.float32)) \\
    + 4 * torch.nn.functional.one_hot(labels, 100)
right = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]]), torch.zeros(4, dtype=torch.long)
print(json.dumps([fit_temperature(logits, labels, 0.1, 10), fit_temperature(*right, 0.1, 10),
                  torch.backends.cpu.get_cpu_capability()]))
"""


@pytest.mark.slow
def test_the_fit_is_the_same_whatever_the_simd_width() -> None:
    """ATEN_CPU_CAPABILITY picks the width of torch's vectorised CPU kernels (the float32 LBFGS fit moved by
    1e-3 between them). Only the widths this CPU can run are tried: asking for AVX-512 on a CPU without it
    kills torch with SIGILL (torch 2.x does not fall back)."""
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    capabilities = ["default"] + [name for name, flag in (("avx2", "avx2"), ("avx512", "avx512f")) if flag in flags]
    results = {}
    for capability in capabilities:
        environment = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "1"}
        output = subprocess.run([sys.executable, "-c", CAPABILITY_PROBE], cwd=PROJECT, env=environment,
                                capture_output=True, text=True, check=True, timeout=120).stdout
        results[capability] = json.loads(output.splitlines()[-1])
    reference = results["default"]
    assert reference[1] == pytest.approx(1 / math.log(3), rel=1e-9)
    for capability, (multi, two, reported) in results.items():
        assert reported.lower() == ("default" if capability == "default" else capability)  # the width ran
        assert multi == pytest.approx(reference[0], rel=1e-12) and two == pytest.approx(reference[1], rel=1e-12)
