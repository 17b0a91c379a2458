"""The shared losses of reproduce/losses.py against hand-computed values and exact identities (each
method's own maths is tested with the method: tests/test_<method>.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reproduce.losses import (
    balanced_kd_loss,
    dkd_loss,
    dkd_parts,
    forward_kl_per_sample,
    kd_loss,
    reverse_kd_loss,
    reverse_kl_per_sample,
    target_log_probability,
)


def random_logits(seed: int, batch: int = 6, classes: int = 7, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(batch, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) per row, written out from probabilities."""
    return (p * (p.log() - q.log())).sum(dim=1)


# -- KD ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_gradient_identity(temperature: float) -> None:
    student, teacher = random_logits(0).requires_grad_(), random_logits(1)
    kd_loss(student, teacher, temperature).backward()
    expected = temperature * (F.softmax(student / temperature, 1) - F.softmax(teacher / temperature, 1)) / len(student)
    torch.testing.assert_close(student.grad, expected.detach())


def test_kd_loss_two_class_by_hand() -> None:
    # p_t = (3/4, 1/4) at τ = 2 from logits (2·ln 3, 0); p_s = (1/2, 1/2).
    teacher = torch.tensor([[2 * math.log(3.0), 0.0]])
    student = torch.zeros(1, 2)
    by_hand = 4 * (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5))
    assert kd_loss(student, teacher, 2.0).item() == pytest.approx(by_hand, rel=1e-6)
    assert by_hand == pytest.approx(4 * 0.130812, rel=1e-5)


def test_kd_loss_is_batchmean_not_classmean() -> None:
    student, teacher = random_logits(2), random_logits(3)
    by_hand = kl(F.softmax(teacher, 1), F.softmax(student, 1)).mean()
    torch.testing.assert_close(kd_loss(student, teacher, 1.0), by_hand)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_reverse_kd_is_kl_of_student_to_teacher(temperature: float) -> None:
    student, teacher = random_logits(4), random_logits(5)
    p_s, p_t = F.softmax(student / temperature, 1), F.softmax(teacher / temperature, 1)
    torch.testing.assert_close(reverse_kd_loss(student, teacher, temperature), temperature**2 * kl(p_s, p_t).mean())


def test_every_peer_target_is_detached() -> None:
    target = torch.tensor([0, 1, 2, 3, 4, 5])
    student, teacher = random_logits(6).requires_grad_(), random_logits(7).requires_grad_()
    weight = torch.full((6,), 0.3, dtype=torch.float64, requires_grad=True)
    losses = [kd_loss(student, teacher, 2.0), reverse_kd_loss(student, teacher, 2.0),
              dkd_loss(student, teacher, target, 1.0, 8.0, 4.0), balanced_kd_loss(student, teacher, weight, 2.0),
              forward_kl_per_sample(student, teacher, 3.0).sum(), reverse_kl_per_sample(student, teacher, 3.0).sum()]
    sum(losses).backward()
    assert teacher.grad is None and weight.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


# -- DKD -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kl_splits_into_tckd_and_weighted_nckd(temperature: float) -> None:
    student, teacher = random_logits(8), random_logits(9)
    target = torch.tensor([0, 3, 6, 2, 2, 5])
    tckd, nckd = dkd_parts(student, teacher, target, temperature)
    p_s, p_t = F.softmax(student / temperature, 1), F.softmax(teacher / temperature, 1)
    teacher_target = p_t.gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(kl(p_t, p_s), tckd + (1 - teacher_target) * nckd)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dkd_loss_by_hand(temperature: float) -> None:
    # Teacher (2/5, 2/5, 1/5), student uniform, target 0:
    # b_t = (2/5, 3/5), b_s = (1/3, 2/3); non-target p̂_t = (2/3, 1/3), p̂_s = (1/2, 1/2).
    teacher = temperature * torch.tensor([[math.log(2.0), math.log(2.0), 0.0]])
    student = torch.zeros(1, 3)
    tckd = 0.4 * math.log(0.4 / (1 / 3)) + 0.6 * math.log(0.6 / (2 / 3))
    nckd = (2 / 3) * math.log((2 / 3) / 0.5) + (1 / 3) * math.log((1 / 3) / 0.5)
    loss = dkd_loss(student, teacher, torch.tensor([0]), alpha=1.0, beta=8.0, temperature=temperature)
    assert loss.item() == pytest.approx(temperature**2 * (tckd + 8 * nckd), rel=1e-5)
    assert tckd + 8 * nckd == pytest.approx(0.462777, rel=1e-5)


def test_dkd_is_finite_for_a_saturated_teacher() -> None:
    teacher = torch.tensor([[60.0, -60.0, -60.0]])
    loss = dkd_loss(torch.zeros(1, 3, requires_grad=True), teacher, torch.tensor([0]), 1.0, 8.0, 1.0)
    loss.backward()
    assert torch.isfinite(loss)


def test_target_log_probability() -> None:
    logits = torch.tensor([[math.log(3.0), 0.0]])
    assert target_log_probability(logits, torch.tensor([0]), 1.0).item() == pytest.approx(math.log(0.75))


# -- BD-KD ---------------------------------------------------------------------------------------


def test_balanced_kd_interpolates_forward_and_reverse() -> None:
    student, teacher = random_logits(10), random_logits(11)
    ones, zeros = torch.ones(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    torch.testing.assert_close(balanced_kd_loss(student, teacher, ones, 2.0), kd_loss(student, teacher, 2.0))
    torch.testing.assert_close(balanced_kd_loss(student, teacher, zeros, 2.0), reverse_kd_loss(student, teacher, 2.0))
    half = balanced_kd_loss(student, teacher, ones / 2, 2.0)
    torch.testing.assert_close(half, (kd_loss(student, teacher, 2.0) + reverse_kd_loss(student, teacher, 2.0)) / 2)
