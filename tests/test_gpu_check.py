"""The GPU check (benchmarks/gpu_check.py) and the CUDA-only tests it runs.

The tests named ``*cuda*`` need a CUDA GPU and skip without one; ``make gpu-check`` runs them. The
others keep the check from rotting on a CPU: its dry run (the same code paths at toy sizes) and its
loss comparison, which must hold for channels_last in fp32 on a CPU too.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import PROJECT, tiny_config

if str(PROJECT) not in sys.path:  # benchmarks/ is run from the checkout, not installed
    sys.path.insert(0, str(PROJECT))

from benchmarks import equivalence, gpu_check  # noqa: E402
from reproduce.runtime import resolve_runtime  # noqa: E402
from reproduce.train import RunSpec, train  # noqa: E402
from reproduce.config import RuntimeConfig, deep_merge  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)")
DRY_RUN = deep_merge(gpu_check.SETTINGS, gpu_check.DRY_RUN_OVERRIDES)
CPU = torch.device("cpu")


def _run_check(*args: str, timeout: float = 500) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=PROJECT, capture_output=True,
                          text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------
# On any machine


@pytest.mark.slow
def test_dry_run_reports_every_method_in_every_table() -> None:
    result = _run_check("--dry-run")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    teacher, student = DRY_RUN["pairs"][0]
    for name in gpu_check.registered_methods():
        equivalence = [line for line in lines if line.split()[:1] == [name] and "(tol" in line]
        assert len(equivalence) == 1, f"no equivalence row for {name}"
        assert "ok" in equivalence[0].split()[1]  # channels_last, enforced on the CPU
        throughput = [line for line in lines if line.split()[:3] == [f"{teacher}->{student}", "8", name]]
        assert len(throughput) == 1, f"no throughput row for {name}"
        fp32_rate = throughput[0].split()[3]
        assert float(fp32_rate) > 0
        costs = [line for line in lines if line.split()[:2] == [name, "syncs/step"]]
        assert len(costs) == 1 and costs[0].split()[2:4] == ["0.00", "ok"], f"{name}: {costs}"  # target 0
    epoch = [line for line in lines if "epoch of 64 images (8 steps of 8)" in line]
    assert len(epoch) == 1, result.stdout
    assert any("suite / floor" in line and "target <= 1.15" in line for line in lines)
    assert any("240-epoch run projected" in line and "target < 15 min" in line for line in lines)
    assert any("top-level CPU ops per step" in line for line in lines)
    for section in gpu_check.SECTIONS:
        assert any(line.startswith(f"-- {section}: ok in ") for line in lines), f"section {section} did not pass"
    assert "GPU utilisation: not measured" in result.stdout
    assert lines[-1].startswith("gpu-check: ok")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the full check runs on this machine's GPU")
def test_without_a_gpu_the_full_check_refuses_with_status_2() -> None:
    result = _run_check(timeout=60)
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr and "--dry-run" in result.stderr


@pytest.mark.parametrize("method", ["kd", "dml", "sokd"])
def test_channels_last_keeps_the_fp32_losses_on_cpu(method: str, one_torch_thread: None) -> None:
    [comparison] = equivalence.check_equivalence(method, ["channels_last"], DRY_RUN, CPU)
    assert comparison.compared >= 4  # every term of both steps was compared
    assert comparison.worst <= 1e-5, comparison
    assert comparison.ok


def test_the_comparison_sees_a_changed_loss(one_torch_thread: None) -> None:
    # bf16 really moves the losses: a tolerance below that must fail, one above it must pass.
    [loose] = equivalence.check_equivalence("kd", ["bf16"], DRY_RUN, CPU, tolerances={"bf16": 1.0})
    assert 1e-5 < loose.worst < 1.0 and loose.ok
    [strict] = equivalence.check_equivalence("kd", ["bf16"], DRY_RUN, CPU, tolerances={"bf16": 1e-6})
    assert not strict.ok and strict.worst_term.startswith("step")


def test_errors_are_fractions_of_the_role_loss_and_branches_are_named() -> None:
    reference = {"step1 student/ce": 3.0, "step1 student/kd": 1.0, "step1 teacher/ce": 2.0}
    candidate = {"step1 student/ce": 3.0, "step1 student/kd": 1.2, "step1 other/ce": 2.0}
    comparison = equivalence.compare_losses(reference, candidate, "bf16", tolerance=0.04)
    assert comparison.worst == pytest.approx(0.2 / 4.0)
    assert comparison.worst_term == "step1 student/kd"
    assert comparison.compared == 2
    assert comparison.one_sided == ["step1 other/ce", "step1 teacher/ce"]
    assert not comparison.ok
    nan = equivalence.compare_losses(reference, {**reference, "step1 student/kd": math.nan}, "bf16", 1.0)
    assert nan.worst == math.inf and not nan.ok
    assert equivalence.compare_losses(reference, reference, "bf16", None).ok  # not enforced: reported only


def test_an_exhausted_budget_fails_the_equivalence_it_skips(capsys: pytest.CaptureFixture[str]) -> None:
    status = gpu_check.main(["--dry-run", "--budget-s", "0", "--sections", "equivalence", "--methods", "kd"])
    output = capsys.readouterr().out
    assert status == 1
    assert "SKIPPED (budget)" in output and "FAILED: equivalence" in output


def test_budget_shares_roll_over_to_later_sections() -> None:
    budget = gpu_check.Budget(100.0, {"a": 1.0, "b": 1.0, "c": 2.0})
    first = budget.section_deadline("a") - budget.start
    assert first == pytest.approx(25.0, abs=0.5)
    # "a" used no time: "b" gets a third of the 100 s left, "c" then everything that remains.
    assert budget.section_deadline("b") - budget.start == pytest.approx(100 / 3, abs=0.5)
    assert budget.section_deadline("c") - budget.start == pytest.approx(100.0, abs=0.5)


def test_the_hard_limit_ends_a_run_that_overstays() -> None:
    with pytest.raises(gpu_check.HardBudgetExceeded):
        with gpu_check.hard_limit(1):
            subprocess.run([sys.executable, "-c", "import time; time.sleep(10)"], timeout=20)
    # Not an Exception: a cell's `except Exception` must let it through.
    assert not issubclass(gpu_check.HardBudgetExceeded, Exception)


def test_the_gpu_tests_are_in_the_files_that_mention_it(tmp_path: Path) -> None:
    (tmp_path / "test_gpu.py").write_text("needs = torch.cuda.is_available()\n")
    (tmp_path / "test_plain.py").write_text("def test_x(): pass\n")
    (tmp_path / "helper_cuda.py").write_text("# CUDA, but not a test file\n")
    assert gpu_check.cuda_test_files(tmp_path) == [tmp_path / "test_gpu.py"]
    assert Path(__file__).resolve() in gpu_check.cuda_test_files(PROJECT / "tests")


# ----------------------------------------------------------------------------------------------
# On a CUDA GPU (named *cuda*: `make gpu-check` selects them with -k cuda)


@needs_cuda
def test_cuda_runtime_auto_is_bf16_and_channels_last() -> None:
    runtime = resolve_runtime(RuntimeConfig())
    assert runtime.device.type == "cuda"
    assert runtime.channels_last
    assert runtime.amp_dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else None)


@needs_cuda
@pytest.mark.parametrize("method", ["kd", "dml", "switokd"])
def test_cuda_bf16_and_channels_last_keep_the_fp32_losses(method: str) -> None:
    comparisons = equivalence.check_equivalence(method, ["channels_last", "bf16"], DRY_RUN, torch.device("cuda"))
    for comparison in comparisons:
        assert comparison.tolerance is not None and comparison.ok, comparison


@needs_cuda
def test_cuda_device_loader_keeps_batches_on_the_gpu_in_channels_last() -> None:
    from reproduce.data.loader import DeviceLoader, Normalise
    from reproduce.data.prepare import Split

    generator = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=generator),
                  torch.randint(0, 10, (40,), generator=generator))
    batches = {}
    for device in (torch.device("cuda"), CPU):
        normalise = Normalise([0.5] * 3, [0.25] * 3, device, channels_last=True)
        batches[device.type] = list(DeviceLoader(split, batch_size=16, normalise=normalise, device=device).epoch(0))
    for (x, y), (x_cpu, y_cpu) in zip(batches["cuda"], batches["cpu"], strict=True):
        assert x.is_cuda and y.is_cuda and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(x.cpu(), x_cpu, rtol=0, atol=1e-6)
        assert torch.equal(y.cpu(), y_cpu)
    train = DeviceLoader(split, batch_size=16, normalise=Normalise([0.5] * 3, [0.25] * 3, torch.device("cuda"), True),
                         device=torch.device("cuda"), seed=0, train=True)
    assert [x.shape[0] for x, _ in train.epoch(1)] == [16, 16]  # the partial batch is dropped


@needs_cuda
def test_cuda_training_run_with_bf16_channels_last_and_compile(prepared_root: Path, tmp_path: Path) -> None:
    # The engine's whole CUDA path: loaders on the GPU, compiled networks, bf16 training and evaluation.
    config = tiny_config(prepared_root, tmp_path, recipe={"epochs": 1},
                         runtime={"device": "cuda", "amp": "bf16", "channels_last": "on", "compile": "on"})
    run_dir = tmp_path / "runs" / "dml" / "seed0"
    summary = train(config, RunSpec("dml", 0, run_dir, tmp_path / "checkpoints"), track=False)
    assert summary["environment"]["device"].startswith("cuda")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for network in ("teacher", "student"):
        top1 = metrics["last"]["test"][network]["top1"]
        assert math.isfinite(top1) and 0 <= top1 <= 100
    assert metrics["time"]["images_per_s"] > 0
    assert os.path.getsize(run_dir / "predictions.pt") > 0
