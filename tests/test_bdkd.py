"""BD-KD (reproduce/methods/bdkd.py): the forward/reverse weighting rules and the teacher regulariser."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from method_kit import batch, build, constant_output, declares, trains_and_learns
from reproduce.losses import kd_loss, reverse_kd_loss
from reproduce.methods import Method
from reproduce.methods.bdkd import FORWARD_WEIGHTINGS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_declarations_and_bad_options() -> None:
    declares("bdkd", "BD-KD", 30, bad=[{"weighting": "soft"}, {"teacher_reg": "forward"}])


def test_bdkd_weights_are_in_unit_interval() -> None:
    generator = torch.Generator().manual_seed(0)
    h_s, h_t = 3 * torch.rand(200, generator=generator), 3 * torch.rand(200, generator=generator)
    for rule in FORWARD_WEIGHTINGS.values():
        weight = rule(h_s, h_t, 2.0)
        assert weight.min() >= 0 and weight.max() <= 1


def test_bdkd_weighting_rules_by_hand() -> None:
    h_s, h_t = torch.tensor([0.5, 2.0, 1.0]), torch.tensor([1.5, 1.0, 1.0])
    torch.testing.assert_close(FORWARD_WEIGHTINGS["entropy_ratio"](h_s, h_t, 1.0), torch.tensor([0.75, 1 / 3, 0.5]))
    torch.testing.assert_close(FORWARD_WEIGHTINGS["hard"](h_s, h_t, 1.0), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(FORWARD_WEIGHTINGS["sigmoid"](h_s, h_t, 2.0),
                               torch.tensor([1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(2.0)), 0.5]))


def test_bdkd_entropy_ratio_grows_with_the_entropy_gap() -> None:
    """Documented direction: the more confident the student relative to the teacher (H_t − H_s up),
    the more weight on the forward (mass-covering) KL."""
    h_t = torch.full((5,), 1.2)
    h_s = torch.tensor([2.0, 1.5, 1.2, 0.8, 0.1])  # H_t − H_s increasing
    weight = FORWARD_WEIGHTINGS["entropy_ratio"](h_s, h_t, 1.0)
    assert (weight.diff() > 0).all() and weight[2] == pytest.approx(0.5)


def bdkd_with_sharp_student(**params: Any) -> Method:
    method = build("bdkd", **params)
    constant_output(method.student, [0.91] + [0.01] * 9)  # H_s < H_t for every sample
    constant_output(method.teacher, [0.4] + [1 / 15] * 9)
    return method


def test_bdkd_student_loss_is_fkl_at_w_one_and_rkl_at_w_zero() -> None:
    x, y = batch()
    for flip, divergence in ((False, kd_loss), (True, reverse_kd_loss)):
        method = bdkd_with_sharp_student(weighting="hard", flip=flip, student_kd_weight=0.7, temperature=2.0)
        step = method.step(x, y, 1)
        assert float(step.signals["forward_weight"]) == (0.0 if flip else 1.0)
        with torch.no_grad():
            student_logits, teacher_logits = method.student(x), method.teacher(x)
        expected = 0.7 * divergence(student_logits, teacher_logits, 2.0)
        assert step.losses["student"]["kd"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_bdkd_flip_swaps_the_weights() -> None:
    x, y = batch()
    weight = float(bdkd_with_sharp_student().step(x, y, 1).signals["forward_weight"])
    flipped = float(bdkd_with_sharp_student(flip=True).step(x, y, 1).signals["forward_weight"])
    assert weight > 0.5 and flipped == pytest.approx(1 - weight)


@pytest.mark.parametrize("teacher_reg, divergence", [("dml", kd_loss), ("reverse", reverse_kd_loss)])
def test_bdkd_teacher_regulariser(teacher_reg: str, divergence: Any) -> None:
    method = build("bdkd", teacher_reg=teacher_reg, teacher_kd_weight=0.5, temperature=3.0)
    x, y = batch()
    step = method.step(x, y, 1)
    with torch.no_grad():
        expected = 0.5 * divergence(method.teacher(x), method.student(x), 3.0)
    assert step.losses["teacher"]["kd"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.slow
def test_training_lowers_the_loss_and_the_student_learns(prepared_root: Path, tmp_path: Path) -> None:
    summary = trains_and_learns("bdkd", {}, prepared_root, tmp_path)
    assert set(summary["signals"]) == {"student_entropy", "forward_weight", "teacher_entropy"}
