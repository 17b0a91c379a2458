"""SOKD (reproduce/methods/sokd.py): the branch on the frozen trunk, what learns from what, its options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from method_kit import batch, build, grads_are_none, has_grads, declares, total_loss, trains_and_learns
from reproduce.train import make_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_declarations_and_bad_options() -> None:
    declares("sokd", "SOKD", 33, bad=[{"aux_init": "zeros"}, {"frozen_bn": "off"}])


def test_sokd_gradients_reach_only_the_branch_and_the_student() -> None:
    method = build("sokd")
    step = method.step(*batch(), 1)
    (total_loss(step, "aux") + total_loss(step, "student")).backward()
    assert grads_are_none(method.teacher)  # trunk and head of T
    assert has_grads(method.aux.head) and has_grads(method.student)
    assert method.aux.trunk is method.teacher.trunk
    optimizer = make_optimizer(method.roles()["aux"], tiny_config(Path("."), Path(".")).recipe.optimizer)
    assert len(optimizer.param_groups[0]["params"]) == len(list(method.aux.head.parameters()))


def test_sokd_student_learns_from_the_branch_not_the_teacher() -> None:
    method = build("sokd")
    x, y = batch()

    def student_kd() -> float:
        return method.step(x, y, 1).losses["student"]["kd"].item()

    before = student_kd()
    with torch.no_grad():
        method.teacher.classifier.weight.mul_(-3.0)  # T's own head changes ...
    assert student_kd() == pytest.approx(before, rel=1e-6)  # ... the student's target does not
    with torch.no_grad():
        method.aux.classifier.weight.mul_(-3.0)
    assert student_kd() != pytest.approx(before, rel=1e-3)


def test_sokd_options() -> None:
    teacher_copy = build("sokd", aux_init="teacher")
    pairs = zip(teacher_copy.aux.head.parameters(), teacher_copy.teacher.head.parameters(), strict=True)
    for branch, original in pairs:
        assert torch.equal(branch, original) and branch.requires_grad and not original.requires_grad
    random_init = build("sokd")
    assert not torch.equal(random_init.aux.classifier.weight, random_init.teacher.classifier.weight)
    assert random_init.teacher.training  # frozen_bn train: the code's quirk
    evaluated = build("sokd", frozen_bn="eval")
    assert not evaluated.teacher.training and not evaluated.aux.trunk.training and evaluated.aux.head.training
    assert set(random_init.eval_networks()) == {"teacher", "aux", "student"}


@pytest.mark.slow
def test_training_lowers_the_loss_and_the_student_learns(prepared_root: Path, teacher_runs_root: Path,
                                                         tmp_path: Path) -> None:
    summary = trains_and_learns("sokd", {}, prepared_root, tmp_path, teacher_runs_root)
    assert set(summary["signals"]) == set()
