"""AEKT (reproduce/methods/aekt.py): DKD as a special case, its heads, the clipped ratio, its figure."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from method_kit import CLASSES, batch, build, has_grads, declares, total_loss, trains_and_learns
from reproduce.losses import dkd_parts, target_log_probability
from reproduce.train import make_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_declarations_and_bad_options() -> None:
    declares("aekt", "AEKT", 31, bad=[{"head": "diagonal"}, {"explicit_weighting": "square"}])


def test_aekt_with_g_one_is_dkd_with_alpha_gamma() -> None:
    aekt = build("aekt", explicit_weighting="one", gamma=1.7, beta=5.0, warmup_epochs=3)
    dkd = build("dkd", alpha=1.7, beta=5.0, warmup_epochs=3)
    dkd.student.load_state_dict(aekt.student.state_dict())
    dkd.teacher.load_state_dict(aekt.teacher.state_dict())
    x, y = batch()
    for epoch in (1, 5):
        assert total_loss(aekt.step(x, y, epoch), "student").item() == pytest.approx(
            total_loss(dkd.step(x, y, epoch), "student").item(), rel=1e-5)


def test_aekt_serial_head_starts_as_identity() -> None:
    method = build("aekt")
    torch.testing.assert_close(method.distill_head.weight, torch.eye(CLASSES))
    assert method.distill_head.bias.abs().sum() == 0
    x = batch()[0]
    torch.testing.assert_close(method.distill_head(method.student(x)), method.student(x))
    assert set(method.eval_networks()) == {"student", "teacher"} and method.eval_networks()["student"] is method.student


def test_aekt_ratio_weights_tckd_and_is_clipped() -> None:
    x, y = batch()
    method = build("aekt", warmup_epochs=1, gamma=2.0)
    step = method.step(x, y, 1)
    with torch.no_grad():
        teacher_logits, student_logits = method.teacher(x), method.student(x)
        tckd, _ = dkd_parts(student_logits, teacher_logits, y, 4.0)
        ratio = (target_log_probability(teacher_logits, y, 4.0) - target_log_probability(student_logits, y, 4.0)).exp()
    expected = 4.0**2 * 2.0 * (ratio.clamp(0, 10) * tckd).mean()  # τ²·γ·mean(r·TCKD)
    assert step.losses["student"]["explicit"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert float(step.signals["ratio"]) == pytest.approx(ratio.clamp(0, 10).mean().item(), rel=1e-4)
    clipped = build("aekt", max_ratio=1e-3).step(x, y, 1)
    assert ratio.min().item() > 1e-3 and float(clipped.signals["ratio"]) == pytest.approx(1e-3)  # all clipped


def test_aekt_parallel_head_reads_features_and_trains_with_the_student() -> None:
    method = build("aekt", head="parallel", warmup_epochs=1)
    assert method.distill_head.in_features == method.student.classifier.in_features
    role = method.roles()["student"]
    total_loss(method.step(*batch(), 1), "student").backward()
    assert has_grads(method.distill_head) and has_grads(method.student.trunk)
    assert len(make_optimizer(role, tiny_config(Path("."), Path(".")).recipe.optimizer).param_groups[0]["params"]) == \
        len(list(method.student.parameters())) + 2


def test_aekt_saves_the_serial_head_as_an_image(tmp_path: Path) -> None:
    artefacts = build("aekt").end_of_training(tmp_path)
    assert artefacts["aekt_fc_ser"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert build("aekt", head="parallel").end_of_training(tmp_path) == {}


@pytest.mark.slow
def test_training_lowers_the_loss_and_the_student_learns(prepared_root: Path, teacher_runs_root: Path,
                                                         tmp_path: Path) -> None:
    summary = trains_and_learns("aekt", {"warmup_epochs": 1}, prepared_root, tmp_path, teacher_runs_root)
    assert set(summary["signals"]) == {"ratio"}
