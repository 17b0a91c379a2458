"""R2KD (reproduce/methods/r2kd.py): correlation and rank terms, the pruned teacher, the augmented view."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import reproduce.methods.r2kd as r2kd
from method_kit import batch, build, declares, has_grads, random_logits, trains_and_learns
from reproduce.data.augment import AUGMENTATIONS
from reproduce.methods.r2kd import (
    correlation_distance,
    correlation_value_loss,
    hard_ranks,
    rank_loss,
    soft_ranks,
    spearman_correlation,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_declarations_and_bad_options() -> None:
    method_cls = declares("r2kd", "R2KD", 34, bad=[{"augmentation": "autoaugment"}, {"rank_gradient": "hard"},
                                                   {"pruned_teacher_mode": "frozen"}])
    assert "rank_weight" not in method_cls.search_space  # no gradient with the code's argsort ranks


def test_correlation_distance_cases_by_hand() -> None:
    a = torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0], [0.5, -1.0, 2.0], [1.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0], [-0.5, 1.0, -2.0], [1.0, 1.0, 0.0]])
    assert correlation_distance(a[:1], b[:1]).item() == pytest.approx(0.0, abs=1e-6)  # identical
    assert correlation_distance(a[1:2], b[1:2]).item() == pytest.approx(1.0)  # orthogonal
    assert correlation_distance(a[2:3], b[2:3]).item() == pytest.approx(0.0, abs=1e-6)  # negated: |cos| = 1
    assert correlation_distance(a[3:], b[3:]).item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)
    assert correlation_distance(a, b).item() == pytest.approx((0 + 1 + 0 + 1 - 1 / math.sqrt(2)) / 4, rel=1e-6)


def test_correlation_value_loss_uses_rows_and_columns() -> None:
    student, teacher = random_logits(12), random_logits(13)
    p_s, p_t = F.softmax(student / 4, 1), F.softmax(teacher / 4, 1)
    rows = 1 - ((p_s * p_t).sum(1) / (p_s.norm(dim=1) * p_t.norm(dim=1) + 1e-8)).mean()
    columns = 1 - ((p_s * p_t).sum(0) / (p_s.norm(dim=0) * p_t.norm(dim=0) + 1e-8)).mean()
    torch.testing.assert_close(correlation_value_loss(student, teacher, 4.0), 16 * (rows + columns))
    assert correlation_value_loss(teacher, teacher, 4.0).item() == pytest.approx(0.0, abs=1e-5)


def test_ranks_and_spearman() -> None:
    values = torch.tensor([[0.1, 0.5, 0.3, -2.0]])
    assert hard_ranks(values).tolist() == [[2.0, 4.0, 3.0, 1.0]]
    torch.testing.assert_close(soft_ranks(values, 1e-3), hard_ranks(values))
    ranks = hard_ranks(values)
    assert spearman_correlation(ranks, ranks).item() == pytest.approx(1.0)
    assert spearman_correlation(ranks, 5 - ranks).item() == pytest.approx(-1.0)
    # ranks (1, 2, 3) vs (1, 3, 2): ρ = 1 − 6·Σd²/(n(n² − 1)) = 1 − 6·2/24 = 0.5
    in_order, swapped = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 3.0, 2.0]])
    assert spearman_correlation(in_order, swapped).item() == pytest.approx(0.5)


def test_rank_loss_has_a_gradient_only_when_soft() -> None:
    student, teacher = random_logits(14).requires_grad_(), random_logits(15)
    assert not rank_loss(student, teacher, 4.0).requires_grad
    soft = rank_loss(student, teacher, 4.0, soft_rank_scale=0.1)
    soft.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert rank_loss(teacher, teacher, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert rank_loss(-teacher, teacher, 4.0).item() == pytest.approx(2.0, abs=1e-6)


def test_r2kd_value_and_rank_targets_are_detached() -> None:
    student, teacher = random_logits(16).requires_grad_(), random_logits(17).requires_grad_()
    (correlation_value_loss(student, teacher, 4.0) + rank_loss(student, teacher, 4.0, soft_rank_scale=0.1)
     + correlation_distance(student, teacher)).backward()
    assert teacher.grad is None and student.grad is not None and student.grad.abs().sum() > 0


def test_rank_loss_ranks_the_softened_probabilities_as_the_code_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """The code ranks softmax(z/τ), not z. Within a row both give the same order, so the check is on
    what the ranking is fed. The logits are chosen so that the two inputs differ in a way that would
    show: the ranks down each column (across the batch) differ between z and softmax(z/τ)."""
    # Class 1: a larger logit in row 0 (4 > 3), a larger probability in row 1 (0.36 < 0.69 at τ = 2).
    student = torch.tensor([[5.0, 4.0, 0.0], [0.0, 3.0, 0.0]])
    teacher = torch.tensor([[6.0, 5.0, 0.0], [0.0, 4.0, 1.0]])
    temperature = 2.0
    fed: list[Tensor] = []

    def recording_ranks(values: Tensor) -> Tensor:
        fed.append(values.clone())
        return hard_ranks(values)

    monkeypatch.setattr(r2kd, "hard_ranks", recording_ranks)
    r2kd.rank_loss(student, teacher, temperature)
    expected = [F.softmax(teacher / temperature, 1), F.softmax(student / temperature, 1)]
    assert len(fed) == 2
    for values, softened in zip(fed, expected, strict=True):
        torch.testing.assert_close(values, softened)
    column_ranks = lambda values: hard_ranks(values.T).T  # noqa: E731  rank of each sample within its class
    assert not torch.equal(column_ranks(student), column_ranks(F.softmax(student / temperature, 1)))
    assert not torch.equal(column_ranks(teacher), column_ranks(F.softmax(teacher / temperature, 1)))
    assert torch.equal(hard_ranks(student), hard_ranks(F.softmax(student / temperature, 1)))  # rows agree


def test_r2kd_rank_term_uses_the_softened_ensemble(monkeypatch: pytest.MonkeyPatch) -> None:
    method = build("r2kd", augmentation="none", temperature=3.0)
    x, y = batch()
    fed: list[Tensor] = []
    real_rank_loss = r2kd.rank_loss

    def recording(student: Tensor, teacher: Tensor, temperature: float, scale: float | None = None) -> Tensor:
        fed.append(teacher)
        assert temperature == 3.0
        return real_rank_loss(student, teacher, temperature, scale)

    monkeypatch.setattr(r2kd, "rank_loss", recording)
    step = method.step(x, y, 1)
    with torch.no_grad():
        ensemble = 0.7 * method.teacher(x) + 0.3 * method.pruned_teacher(x)
        expected = 2.0 * real_rank_loss(method.student(x), ensemble, 3.0)
    torch.testing.assert_close(fed[0], ensemble)
    assert step.losses["student"]["rank"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_r2kd_prunes_ten_percent_of_every_weight_tensor() -> None:
    method = build("r2kd")
    teacher, pruned = method.teacher, method.pruned_teacher
    layers = 0
    for (name, original), copy_ in zip(teacher.named_modules(), pruned.modules(), strict=True):
        if isinstance(original, (nn.Conv2d, nn.Linear)):
            layers += 1
            zeros = copy_.weight == 0
            assert int(zeros.sum()) == round(0.1 * original.weight.numel()), name
            assert (original.weight != 0).all()  # the teacher itself is untouched
            kept = ~zeros
            assert torch.equal(copy_.weight[kept], original.weight[kept])
            assert original.weight[zeros].abs().max() <= original.weight[kept].abs().min()  # the smallest go
            if original.bias is not None:
                assert torch.equal(copy_.bias, original.bias)
        elif isinstance(original, nn.BatchNorm2d):
            for key, value in original.state_dict().items():
                assert torch.equal(copy_.state_dict()[key], value)
    assert layers >= 8
    assert 0.09 < method.pruned_sparsity < 0.11


def test_r2kd_rank_term_has_a_gradient_only_when_soft() -> None:
    x, y = batch()
    code_faithful = build("r2kd").step(x, y, 1)
    assert not code_faithful.losses["student"]["rank"].requires_grad
    assert code_faithful.losses["student"]["value"].requires_grad
    soft = build("r2kd", rank_gradient="soft")
    soft.step(x, y, 1).losses["student"]["rank"].backward()
    assert has_grads(soft.student)


def test_r2kd_kd_terms_cover_the_augmented_view() -> None:
    x, y = batch()
    torch.manual_seed(3)
    clean_only = build("r2kd", augmentation="none").step(x, y, 1).losses["student"]
    torch.manual_seed(3)
    both = build("r2kd").step(x, y, 1).losses["student"]
    assert both["value"].item() > clean_only["value"].item()
    assert both["ce"].item() == pytest.approx(clean_only["ce"].item(), rel=1e-6)  # CE on the clean batch only


def test_r2kd_teacher_modes() -> None:
    code_mode, eval_mode = build("r2kd"), build("r2kd", pruned_teacher_mode="eval")
    assert code_mode.pruned_teacher.training and not code_mode.teacher.training
    assert not eval_mode.pruned_teacher.training
    assert set(code_mode.eval_networks()) == {"student", "teacher", "pruned_teacher"}


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_augmentations_are_batched_and_follow_the_global_rng(name: str) -> None:
    images = torch.randn(8, 3, 32, 32)
    torch.manual_seed(0)
    first = AUGMENTATIONS[name](images)
    torch.manual_seed(0)
    again = AUGMENTATIONS[name](images)
    assert first.shape == images.shape and torch.equal(first, again) and not torch.equal(first, images)


def test_cutout_zeroes_one_box_per_batch() -> None:
    torch.manual_seed(1)
    holed = AUGMENTATIONS["cutout"](torch.ones(4, 3, 32, 32))
    holes = holed == 0
    assert torch.equal(holes, holes[:1].expand_as(holes))  # the code's one box for the whole batch
    assert 0 < int(holes[0, 0].sum()) <= 64


@pytest.mark.slow
def test_training_lowers_the_loss_and_the_student_learns(prepared_root: Path, teacher_runs_root: Path,
                                                         tmp_path: Path) -> None:
    summary = trains_and_learns("r2kd", {}, prepared_root, tmp_path, teacher_runs_root)
    assert set(summary["signals"]) == {"pruned_sparsity", "loss_value", "loss_rank"}
