"""DKD (reproduce/methods/dkd.py): its warm-up, options and a short training run."""

from __future__ import annotations

from pathlib import Path

import pytest

from method_kit import batch, build, declares, trains_and_learns

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_declarations_and_bad_options() -> None:
    declares("dkd", "DKD", 11, bad=[{"warmup_epochs": 0}, {"temprature": 4.0}])


def test_dkd_warmup_ramps_the_distillation_term() -> None:
    method = build("dkd", warmup_epochs=4)
    x, y = batch()
    kd = [method.step(x, y, epoch).losses["student"]["dkd"].item() for epoch in (1, 2, 4, 9)]
    assert kd[1] == pytest.approx(2 * kd[0], rel=1e-4)
    assert kd[2] == pytest.approx(4 * kd[0], rel=1e-4)
    assert kd[3] == pytest.approx(kd[2], rel=1e-4)


@pytest.mark.slow
def test_training_lowers_the_loss_and_the_student_learns(prepared_root: Path, teacher_runs_root: Path,
                                                         tmp_path: Path) -> None:
    summary = trains_and_learns("dkd", {"warmup_epochs": 1}, prepared_root, tmp_path, teacher_runs_root)
    assert set(summary["signals"]) == set()
