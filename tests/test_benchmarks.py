"""benchmarks/throughput.py times the engine's own training step and counts its ops and host syncs, and its
CLI (`make bench`) keeps its table."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import PROJECT

if str(PROJECT) not in sys.path:  # benchmarks/ is run from the checkout, not installed
    sys.path.insert(0, str(PROJECT))

from benchmarks import throughput  # noqa: E402
from benchmarks.workload import benchmark_runtime, build_workload, random_batch  # noqa: E402
from reproduce.config import config_from_dict  # noqa: E402

CPU = torch.device("cpu")


@pytest.mark.slow
def test_throughput_times_the_engines_training_step(monkeypatch: pytest.MonkeyPatch, one_torch_thread: None) -> None:
    from benchmarks import workload

    calls = []
    real_step = workload.train_step

    def counting_step(method, optimizers, x, y, epoch, runtime, **kwargs):
        calls.append((x.is_contiguous(memory_format=torch.channels_last), runtime.channels_last, runtime.amp_dtype))
        return real_step(method, optimizers, x, y, epoch, runtime, **kwargs)

    monkeypatch.setattr(workload, "train_step", counting_step)
    rate = throughput.method_throughput("kd", "resnet8x4", "resnet8", size=8, channels=1, classes=10, batch=8,
                                        device=CPU, steps=2, repeats=2, channels_last=True, amp=False)
    assert rate > 0
    assert len(calls) == 3 + 2 * 2  # warm-up, then two timed windows of two steps
    assert set(calls) == {(True, True, None)}


def test_offline_methods_get_a_frozen_random_teacher_without_a_checkpoint(tmp_path) -> None:
    config = config_from_dict({"models": {"teacher": "resnet8x4", "student": "resnet8"},
                               "teacher": {"runs_root": str(tmp_path / "nothing-here")}})
    runtime = benchmark_runtime(CPU, amp=False, channels_last=False, compile=False)
    x, y = random_batch(8, 1, 8, 10, runtime)
    work = build_workload("kd", config, 10, 1, runtime, x[:2])
    assert set(work.optimizers) == {"student"}
    method = work.method
    assert not method.teacher.training and not any(p.requires_grad for p in method.teacher.parameters())
    before = [p.clone() for p in method.teacher.parameters()]
    work.step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, method.teacher.parameters()))


def test_ops_and_syncs_are_counted_per_step(one_torch_thread: None) -> None:
    ops, syncs = throughput.ops_and_syncs("kd", "resnet8x4", "resnet8", size=8, channels=1, classes=10, batch=8,
                                          device=CPU, steps=2)
    assert ops > 100 and syncs == 0


@pytest.mark.slow
def test_the_cli_prints_a_row_per_method(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                         one_torch_thread: None) -> None:
    monkeypatch.setattr(sys, "argv", ["throughput", "--methods", "kd", "dml", "--steps", "1", "--repeats", "1",
                                      "--batch", "8", "--device", "cpu"])
    throughput.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("device cpu") and "fp32 channels_last" in lines[1]
    assert "ops/step" in lines[1] and "syncs/step" in lines[1]
    for method in ("kd", "dml"):
        [row] = [line for line in lines if line.split()[:2] == ["resnet8x4:resnet8", method]]
        assert row.count("img/s") == 2
        assert float(row.split()[2]) > 100 and row.split()[3] == "0.00"  # ops and syncs per step
