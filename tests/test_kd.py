"""KD (reproduce/methods/kd.py): Hinton's loss from the frozen teacher."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from method_kit import batch, build, declares
from reproduce.losses import kd_loss
from reproduce.methods import MethodKind

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_declarations() -> None:
    assert declares("kd", "KD", 10, bad=[{"temperature": 0}, {"kd_weight": -1.0}]).kind is MethodKind.OFFLINE


def test_the_student_learns_ce_and_the_tempered_kl_of_the_frozen_teacher() -> None:
    method = build("kd", temperature=3.0, ce_weight=0.2, kd_weight=0.7)
    x, y = batch()
    step = method.step(x, y, 1)
    with torch.no_grad():
        student, teacher = method.student(x), method.teacher(x)
    assert set(step.losses) == {"student"} and not method.teacher.training
    assert step.losses["student"]["ce"].item() == pytest.approx(0.2 * F.cross_entropy(student, y).item(), rel=1e-6)
    assert step.losses["student"]["kd"].item() == pytest.approx(0.7 * kd_loss(student, teacher, 3.0).item(), rel=1e-6)
    step.losses["student"]["kd"].backward()
    assert all(p.grad is None for p in method.teacher.parameters())
