"""One CIFAR-100-shaped epoch of KD on the GPU (`make gpu-check`, section "epoch"), against its compute floor.

- suite: the engine's own ``train_epoch`` (reproduce/train/loop.py) over the engine's DeviceLoader, then
  the evaluation of the test split, as a 240-epoch run would do it every epoch;
- floor: the loop a hand-written KD script would run on the same networks, optimiser and batches (frozen
  teacher under no_grad, student, CE + KD, backward, optimiser step), with nothing of the suite around it;

each in the machine's automatic runtime (bf16 + channels_last on CUDA), eager and compiled. Reported against
their targets: suite / floor <= SUITE_OVER_FLOOR, and the 240-epoch run, projected from the measured epoch and
evaluation, under RUN_TARGET_S. Also the epoch's peak memory and nvidia-smi's utilisation while it ran.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.equivalence import pair_config
from benchmarks.workload import Workload, build_workload, sync
from reproduce.config import RuntimeConfig
from reproduce.losses import kd_loss
from reproduce.runtime import resolve_runtime
from reproduce.train import LearningRates, train_epoch
from reproduce.train.evaluate import evaluate

PROJECT = Path(__file__).resolve().parent.parent
SUITE_OVER_FLOOR = 1.15
RUN_EPOCHS = 240
RUN_TARGET_S = 15 * 60


class GpuSampler:
    """nvidia-smi's utilisation and memory of this GPU, sampled every 200 ms while a block runs.
    Without the binary (or without readings) it reports why, and never fails the check."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.samples: list[tuple[float, float]] = []  # (utilisation %, memory used MiB)
        self.why_none = ""
        self.process: subprocess.Popen | None = None
        self.reader: threading.Thread | None = None

    def __enter__(self) -> "GpuSampler":
        executable = shutil.which("nvidia-smi")
        if self.device.type != "cuda" or executable is None:
            self.why_none = "not a CUDA device" if self.device.type != "cuda" else "nvidia-smi not found"
            return self
        command = [executable, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                   "-lms", "200", "-i", nvidia_smi_index(executable, self.device)]
        try:
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError as error:
            self.why_none = f"nvidia-smi did not start ({error})"
            return self
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            try:
                utilisation, memory = (float(part) for part in line.split(","))
            except ValueError:  # "[N/A]" (a MIG slice has no utilisation) or a partial line
                continue
            self.samples.append((utilisation, memory))

    def __exit__(self, *exc: Any) -> None:
        if self.process is not None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=2)
            if self.reader is not None:
                self.reader.join(timeout=2)

    def summary(self) -> str:
        if not self.samples:
            return f"GPU utilisation: not measured ({self.why_none or 'nvidia-smi gave no readings'})"
        utilisation = [u for u, _ in self.samples]
        return (f"GPU utilisation (nvidia-smi, {len(self.samples)} samples): mean {sum(utilisation) / len(utilisation):.0f}%, "
                f"max {max(utilisation):.0f}%; memory used max {max(m for _, m in self.samples):.0f} MiB")


def nvidia_smi_index(executable: str, device: torch.device) -> str:
    """nvidia-smi's index of ``device``: nvidia-smi ignores CUDA_VISIBLE_DEVICES, so match torch's UUID
    (written with or without the "GPU-" prefix, by version); the first GPU when nothing matches."""
    wanted = str(getattr(torch.cuda.get_device_properties(device), "uuid", "")).removeprefix("GPU-")
    try:
        listing = subprocess.run([executable, "--query-gpu=index,uuid", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "0"
    rows = [[part.strip() for part in line.split(",")] for line in listing.splitlines() if "," in line]
    for index, uuid in rows:
        if wanted and uuid.removeprefix("GPU-") == wanted:
            return index
    return rows[0][0] if rows else "0"


def load_data_fixtures():
    """tests/data_fixtures.py: the writer of files in the exact CIFAR release format (by path: tests/
    is not a package)."""
    spec = importlib.util.spec_from_file_location("data_fixtures", PROJECT / "tests" / "data_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def prepared_cifar100(root: Path, train_images: int, test_images: int) -> Path:
    """Random uint8 images written as the CIFAR-100 release's pickles, then prepared by the suite."""
    from reproduce.data.prepare import prepare

    load_data_fixtures().write_cifar100(root / "raw", n_train=train_images, n_test=test_images, seed=0)
    prepare("cifar100", root / "raw", root / "prepared", val_fraction=0.0, split_seed=0, verify_md5=False,
            progress=False)
    return root / "prepared"


def floor_epoch(work: Workload, batches: Any, epoch: int) -> float:
    """Seconds of the bare KD loop over ``batches``' epoch ``epoch`` (see the module docstring); compiled
    (its loss and its optimiser step, as the suite compiles them) when the workload is."""
    method, runtime = work.method, work.runtime
    student, teacher, params = method.student, method.teacher, method.params
    optimizer = work.optimizers["student"]

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(runtime.device.type, dtype=runtime.amp_dtype or torch.float32,
                            enabled=runtime.amp_dtype is not None):
            with torch.no_grad():
                teacher_logits = teacher(x)
            logits = student(x)
            return (params.ce_weight * F.cross_entropy(logits, y)
                    + params.kd_weight * kd_loss(logits, teacher_logits, params.temperature))

    step = optimizer.step
    if runtime.compile:
        loss, step = torch.compile(loss, dynamic=False), torch.compile(optimizer.step, dynamic=False)
    sync(runtime.device)
    started = time.perf_counter()
    for x, y in batches.epoch(epoch):
        optimizer.zero_grad(set_to_none=True)
        loss(x, y).backward()
        step()
    sync(runtime.device)
    return time.perf_counter() - started


def time_epoch(settings: dict[str, Any], prepared_root: Path, device: torch.device, compile: bool) -> bool:
    """The suite's epoch and evaluation and the floor's epoch, printed against their targets."""
    from reproduce.data.loader import make_loaders
    from reproduce.data.prepare import load_prepared

    ep = settings["epoch"]
    config = pair_config(ep["pair"], dataset={"name": "cifar100", "prepared_root": str(prepared_root),
                                              "val_fraction": 0.0}, recipe={"batch_size": ep["batch"]})
    # The runtime a training run resolves on this machine by default (bf16 + channels_last on CUDA).
    runtime = resolve_runtime(RuntimeConfig(device=str(device), compile="on" if compile else "off"))
    prepared = load_prepared(config.dataset.prepared_dir)
    peak_memory_reset(device)
    train_batches, eval_batches = make_loaders(
        prepared, config.dataset, batch_size=ep["batch"], eval_batch_size=config.recipe.eval_batch_size,
        device=runtime.device, seed=0, channels_last=runtime.channels_last, num_workers=0, dtype=runtime.amp_dtype)
    example = next(iter(train_batches.epoch(0)))[0][:2]
    work = build_workload(ep["method"], config, prepared.num_classes, prepared.in_channels, runtime, example)
    rates = LearningRates.for_recipe(config.recipe, list(work.optimizers), len(train_batches))
    name = (f"{ep['method']} {ep['pair'][0]}->{ep['pair'][1]}, {'bf16' if runtime.amp_dtype else 'fp32'}"
            f"{' + channels_last' if runtime.channels_last else ''}{' + compile' if runtime.compile else ''}")

    started = time.perf_counter()  # warm-up (and compile): a short epoch of the first batches
    warmup = [batch for _, batch in zip(range(ep["warmup_steps"]), train_batches.epoch(0))]
    train_epoch(work.method, work.optimizers, _Listed(warmup), 1, rates, runtime, compiled=work.compiled).result()
    warmup_s = time.perf_counter() - started

    with GpuSampler(device) as sampler:
        tally = train_epoch(work.method, work.optimizers, train_batches, 1, rates, runtime, compiled=work.compiled)
        tally.result()
        started = time.perf_counter()
        evaluate(work.method, eval_batches, runtime)
        eval_s = time.perf_counter() - started
    floor_epoch(work, _Listed(warmup), 0)  # its own warm-up (and compile)
    floor_s = floor_epoch(work, train_batches, 1)
    peak = peak_memory(device)
    steps, seconds = len(train_batches), tally.seconds
    projected = RUN_EPOCHS * (seconds + eval_s)
    ratio = seconds / floor_s
    print(f"{name}: epoch of {len(prepared.train.labels)} images ({steps} steps of {ep['batch']}) {seconds:.2f} s, "
          f"{steps * ep['batch'] / seconds:.0f} img/s; evaluation of {len(prepared.test.labels)} images {eval_s:.2f} s; "
          f"warm-up ({ep['warmup_steps']} step(s){', compile' if runtime.compile else ''}) {warmup_s:.1f} s; "
          f"peak memory (data resident + training) {'-' if peak is None else f'{peak / 2**20:.0f} MiB'}")
    print(f"    suite / floor {ratio:.2f} (floor {floor_s:.2f} s; target <= {SUITE_OVER_FLOOR}): "
          f"{'ok' if ratio <= SUITE_OVER_FLOOR else 'ABOVE TARGET'}")
    print(f"    {RUN_EPOCHS}-epoch run projected {projected / 60:.1f} min (target < {RUN_TARGET_S / 60:.0f} min): "
          f"{'ok' if projected < RUN_TARGET_S else 'ABOVE TARGET'}")
    print(f"    {sampler.summary()}", flush=True)
    return True


class _Listed:
    """Batches already drawn, as the engine's Batches protocol."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int):
        yield from self.batches


def peak_memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def run_epoch(settings: dict[str, Any], device: torch.device, deadline: float) -> bool:
    ep = settings["epoch"]
    ok = True
    with tempfile.TemporaryDirectory(prefix="gpu-check-cifar100-") as tmp:
        started = time.perf_counter()
        root = prepared_cifar100(Path(tmp), ep["train_images"], ep["test_images"])
        print(f"wrote and prepared {ep['train_images']} + {ep['test_images']} CIFAR-100-format images in "
              f"{time.perf_counter() - started:.1f} s")
        torch.backends.cudnn.benchmark = True
        for compile in ep["compile"]:
            if compile and not settings["with_compile"]:
                continue
            if time.perf_counter() > deadline:
                print(f"compile {compile}: skipped (budget)")
                continue
            torch._dynamo.reset()
            try:
                ok &= time_epoch(settings, root, device, compile)
            except Exception as error:
                print(f"ERROR epoch (compile {compile}): {type(error).__name__}: {error}")
                traceback.print_exc(limit=3)
                ok = False
    return ok
