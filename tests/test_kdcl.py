"""KDCL (reproduce/methods/kdcl.py): its ensembles against hand-computed cases, the detached target,
N > 2 networks, and one step with every ensemble option."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import method_kit
from method_kit import batch, declares, trains_and_learns
from reproduce.methods import Method, MethodKind, get_method
from reproduce.methods.kdcl import (
    ENSEMBLES,
    cross_entropy_weights,
    least_squares_weights,
    linear_ensemble,
    mean_ensemble,
    min_logit_ensemble,
    naive_ensemble,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Two networks, three classes, labels (0, 2).
TEACHER = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
STUDENT = torch.tensor([[2.0, 2.0, -1.0], [1.0, 1.0, 3.0]])
LABELS = torch.tensor([0, 2])


def build(**params: Any) -> Method:
    return method_kit.build("kdcl", **params)


def softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v - max(row)) for v in row]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


# -- the ensembles, by hand -----------------------------------------------------------------------


def test_min_logit_by_hand() -> None:
    # Row 0 (label 0): teacher − 3 = (0, −2, −3), student − 2 = (0, 0, −3); minimum (0, −2, −3).
    # Row 1 (label 2): teacher − 1 = (−1, 1, 0), student − 3 = (−2, −2, 0); minimum (−2, −2, 0).
    expected = torch.tensor([[0.0, -2.0, -3.0], [-2.0, -2.0, 0.0]])
    assert torch.equal(min_logit_ensemble([TEACHER, STUDENT], LABELS), expected)


def test_min_logit_is_at_least_as_good_as_every_network_on_every_sample() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = [3 * torch.randn(64, 10, generator=generator) for _ in range(3)]
    target = torch.randint(0, 10, (64,), generator=generator)
    ensemble_ce = F.cross_entropy(min_logit_ensemble(logits, target), target, reduction="none")
    best_ce = torch.stack([F.cross_entropy(z, target, reduction="none") for z in logits]).min(dim=0).values
    assert (ensemble_ce <= best_ce + 1e-6).all()
    assert (min_logit_ensemble(logits, target).gather(1, target[:, None]) == 0).all()


def test_naive_and_mean_by_hand() -> None:
    # CE row 0: teacher log(1 + e⁻² + e⁻³) = 0.170 < student 0.718; row 1: student 0.240 < teacher 1.408.
    assert torch.equal(naive_ensemble([TEACHER, STUDENT], LABELS), torch.tensor([[3.0, 1.0, 0.0], [1.0, 1.0, 3.0]]))
    assert torch.equal(mean_ensemble([TEACHER, STUDENT], LABELS), torch.tensor([[2.5, 1.5, -0.5], [0.5, 1.5, 2.0]]))


# One sample, label 0. Centred over the classes, the label is a0/3 with a0 = (2, −1, −1); o = (0, 1, −1) is
# orthogonal to it. A row shift (softmax ignores it) is added to each network to check the centring.
A0, O = torch.tensor([2.0, -1.0, -1.0]), torch.tensor([0.0, 1.0, -1.0])
ONE_LABEL = torch.tensor([0])


@pytest.mark.parametrize("first, second, weights", [
    (A0 + 3, O + 1, [1.0, 0.0]),  # the fit is (1/3, 0): only the first network explains the label
    (A0 + O, O - 2, [1.0, 0.0]),  # the fit is (1/3, −1/3): the negative weight is clipped at 0
    (2 * A0, A0 + 5, [2 / 3, 1 / 3]),  # collinear: the ridge splits the fit as (2/15, 1/15), i.e. ∝ (2, 1)
    (-A0 + O, -A0 - O, [0.5, 0.5]),  # the fit is (−1/6, −1/6): every weight clips, uniform weights
])
def test_linear_least_squares_weights_by_hand(first: Tensor, second: Tensor, weights: list[float]) -> None:
    stacked = torch.stack([first[None], second[None]])
    torch.testing.assert_close(least_squares_weights(stacked, ONE_LABEL), torch.tensor(weights), atol=1e-4, rtol=0)
    ensemble, fitted = linear_ensemble([first[None], second[None]], ONE_LABEL)
    torch.testing.assert_close(ensemble, (fitted[0] * first + fitted[1] * second)[None])


def test_linear_cross_entropy_weights_minimise_the_batch_loss() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = [3 * torch.randn(32, 10, generator=generator) for _ in range(2)]
    target = torch.randint(0, 10, (32,), generator=generator)
    weights = cross_entropy_weights(torch.stack(logits), target)
    assert weights.min() >= 0 and weights.sum().item() == pytest.approx(1.0)
    grid = min(F.cross_entropy(a / 1000 * logits[0] + (1 - a / 1000) * logits[1], target).item() for a in range(1001))
    found = F.cross_entropy(weights[0] * logits[0] + weights[1] * logits[1], target).item()
    assert found <= grid + 1e-4
    ensemble, fitted = linear_ensemble(logits, target, "cross_entropy")
    torch.testing.assert_close(fitted, weights)


@pytest.mark.parametrize("name", sorted(ENSEMBLES))
def test_every_ensemble_is_detached(name: str) -> None:
    logits = [TEACHER.clone().requires_grad_(), STUDENT.clone().requires_grad_()]
    assert not ENSEMBLES[name](logits, LABELS).requires_grad


# -- the loss -------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature, teacher_loss, student_loss",
                         [(1.0, 1.159743, 0.638390), (2.0, 1.198610, 0.685287)])
def test_each_network_learns_ce_plus_t2_kl_to_the_min_logit_ensemble(temperature: float, teacher_loss: float,
                                                                     student_loss: float) -> None:
    method = build(temperature=temperature, kd_weight=1.0)
    step = method.collaborative_losses({"teacher": TEACHER, "student": STUDENT}, LABELS)
    ensemble = [[0.0, -2.0, -3.0], [-2.0, -2.0, 0.0]]  # by hand above
    for role, logits in (("teacher", TEACHER), ("student", STUDENT)):
        rows = logits.tolist()
        ce = sum(-math.log(softmax(rows[i])[LABELS[i]]) for i in range(2)) / 2
        divergence = sum(kl(softmax([v / temperature for v in ensemble[i]]),
                             softmax([v / temperature for v in rows[i]])) for i in range(2)) / 2
        assert step.losses[role]["ce"].item() == pytest.approx(ce, rel=1e-5)
        assert step.losses[role]["kd"].item() == pytest.approx(temperature**2 * divergence, rel=1e-5)
    # Row 0 of the teacher is the ensemble shifted by 3: its KL there is 0.
    assert sum(step.losses["teacher"].values()).item() == pytest.approx(teacher_loss, rel=1e-5)
    assert sum(step.losses["student"].values()).item() == pytest.approx(student_loss, rel=1e-5)
    assert float(step.signals["ensemble_ce"]) == pytest.approx(
        sum(-math.log(softmax(ensemble[i])[LABELS[i]]) for i in range(2)) / 2, rel=1e-5)


def test_kd_weight_scales_only_the_distillation_term() -> None:
    logits = {"teacher": TEACHER, "student": STUDENT}
    one, half = build().collaborative_losses(logits, LABELS), build(kd_weight=0.5).collaborative_losses(logits, LABELS)
    for role in logits:
        assert half.losses[role]["kd"].item() == pytest.approx(0.5 * one.losses[role]["kd"].item(), rel=1e-6)
        assert half.losses[role]["ce"].item() == pytest.approx(one.losses[role]["ce"].item(), rel=1e-6)


# -- the networks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ensemble", sorted(ENSEMBLES))
def test_each_loss_reaches_only_its_own_network_with_three_networks(ensemble: str) -> None:
    roles = ("teacher", "student", "student2")
    x, y = batch()
    for own in roles:
        method = build(ensemble=ensemble, extra_students=1)
        assert tuple(method.roles()) == roles
        step = method.step(x, y, 1)
        assert set(step.losses) == set(roles) and step.update is None
        sum(step.losses[own].values()).backward()
        for role, network in method.roles().items():
            touched = any(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())
            assert touched == (role == own), f"{own}'s loss {'missed' if role == own else 'reached'} {role}"


def test_one_forward_per_network_per_step() -> None:
    method = build(extra_students=2)
    calls = {role: 0 for role in method.roles()}

    def counter(role: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            calls[role] += 1
        return hook

    for role, network in method.roles().items():
        network.register_forward_hook(counter(role))
    method.step(*batch(), 1)
    assert calls == {"teacher": 1, "student": 1, "student2": 1, "student3": 1}


@pytest.mark.parametrize("ensemble, linear_objective", [(e, "least_squares") for e in sorted(ENSEMBLES)]
                         + [("linear", "cross_entropy")])
def test_every_ensemble_option_trains(ensemble: str, linear_objective: str) -> None:
    method = build(ensemble=ensemble, linear_objective=linear_objective, extra_students=1)
    x, y = batch()
    step = method.step(x, y, 1)
    total = sum(sum(terms.values()) for terms in step.losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(any(p.grad is not None for p in network.parameters()) for network in method.roles().values())
    weights = {key: value for key, value in step.signals.items() if key.startswith("weight_")}
    if ensemble == "linear":
        assert set(weights) == {"weight_teacher", "weight_student", "weight_student2"}
        assert sum(weights.values()) == pytest.approx(1.0, rel=1e-5) and min(weights.values()) >= 0
    else:
        assert not weights
    assert "ensemble_ce" in step.signals


def test_defaults_and_declarations() -> None:
    method_cls = get_method("kdcl")
    assert method_cls.default_params() == {"ensemble": "min_logit", "temperature": 2.0, "kd_weight": 1.0,
                                           "extra_students": 0, "linear_objective": "least_squares"}
    assert method_cls.kind is MethodKind.ONLINE and method_cls.primary == "student"
    assert method_cls.row_order == 21 and method_cls.display_name == "KDCL"
    assert method_cls.search_space == {
        "temperature": {"type": "float", "low": 1, "high": 4},
        "kd_weight": {"type": "float", "low": 0.25, "high": 4, "log": True},
        "ensemble": {"type": "categorical", "choices": ["min_logit", "naive", "mean", "linear"]},
    }


def test_bad_options_name_their_key() -> None:
    declares("kdcl", "KDCL", 21, bad=[{"ensemble": "general"}, {"linear_objective": "ridge"}, {"extra_students": -1}])


@pytest.mark.slow
def test_training_lowers_the_loss_and_the_student_learns(prepared_root: Path, tmp_path: Path) -> None:
    summary = trains_and_learns("kdcl", {}, prepared_root, tmp_path)
    assert set(summary["signals"]) == {"ensemble_ce"}
