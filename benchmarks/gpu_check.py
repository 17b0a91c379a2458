"""The GPU acceptance check (`make gpu-check`): one short, budgeted run on a machine with one CUDA GPU.

    python -m benchmarks.gpu_check                  # one CUDA GPU: about 7 minutes, hard-capped by --budget-s
    python -m benchmarks.gpu_check --dry-run        # any machine: the same code paths at toy sizes, in seconds
    python -m benchmarks.gpu_check --sections equivalence --methods kd dml    # a rerun of one part

Sections, each printing its elapsed time:

1. tests        the CUDA-only tests: in the test files that mention CUDA, the tests named ``*cuda*``.
2. equivalence  for every registered method, the loss terms of its first training steps under
                channels_last, bf16 autocast, and bf16 + channels_last + torch.compile (the engine's
                CUDA runtime with compile on), each against plain fp32 from the same weights and data.
3. throughput   images/s of ``train_step`` for every method, CIFAR pair and batch size, in
                fp32, bf16 + channels_last, and compiled, with each cell's peak GPU memory.
4. epoch        one 50,000-image CIFAR-100-shaped epoch of KD: generated uint8 data written in the
                CIFAR release format, prepared by the suite, resident on the GPU in its DeviceLoader;
                the epoch time, peak memory, and nvidia-smi's utilisation while it ran.

Exit status: 0 every check passed; 1 a check failed or could not finish within the budget; 2 no CUDA
GPU (without --dry-run).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.throughput import benchmark_runtime, build_for_runtime, random_batch, steps_per_second
from reproduce.runtime import Runtime, resolve_runtime
from reproduce.train.optim import set_learning_rates
from reproduce.train.step import train_step
from reproduce.config import RuntimeConfig, config_from_dict, deep_merge

PROJECT = Path(__file__).resolve().parent.parent

SETTINGS: dict[str, Any] = {
    # Wall-clock cap of the whole check. Sections stop starting new cells at their deadline (a share
    # of the time still left, so time one section does not use rolls over to the next); an alarm at
    # budget_s + hard_grace_s ends the run whatever it is doing. 420 + 45 s stays under 8 minutes.
    "budget_s": 420.0,
    "hard_grace_s": 45.0,
    # The checks (tests, equivalence) get room to finish; what they leave rolls over to the measurements.
    "shares": {"tests": 0.25, "equivalence": 0.35, "throughput": 0.3, "epoch": 0.1},
    "with_compile": True,
    "image_size": 32,
    "channels": 3,
    "classes": 100,
    "pairs": [("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2")],  # teacher, student
    "tests": {"directory": "tests", "keyword": "cuda"},
    # Two steps: the second one's losses see the first update (backward and optimiser under the
    # variant). A tenth of the recipe's lr: from a random init, lr 0.05 amplifies a rounding difference
    # of the first step into 4e-5 of the second step's loss (resnet32x4 trained from scratch); at
    # 0.005 the update still moves the loss and amplifies ten times less.
    "equivalence": {"pair": ("resnet32x4", "resnet8x4"), "batch": 64, "steps": 2, "seed": 0, "lr": 0.005,
                    "variants": ["channels_last", "bf16", "bf16+cl+compile"]},
    # Compiled cells only at the recipe's batch (64): every new static shape compiles every network
    # again (tens of seconds each on a cold cache), and batch 64 is the one real runs (and the epoch
    # below) use, so its compiled graphs are compiled once and reused from the cache.
    "throughput": {"batches": [64, 128], "compile_batches": [64], "warmup": 3, "steps": 10,
                   "variants": ["fp32", "bf16+cl", "bf16+cl+compile"]},
    "epoch": {"method": "kd", "pair": ("resnet32x4", "resnet8x4"), "train_images": 50_000,
              "test_images": 10_000, "batch": 64, "warmup_steps": 10, "compile": [False, True]},
}

# The same code paths at sizes a CPU runs in seconds; compile only with --with-compile.
DRY_RUN_OVERRIDES: dict[str, Any] = {
    "budget_s": 300.0,
    "with_compile": False,
    "image_size": 8,
    "classes": 10,
    "pairs": [("resnet8x4", "resnet8")],
    "equivalence": {"pair": ("resnet8x4", "resnet8"), "batch": 8},
    "throughput": {"batches": [8], "compile_batches": [8], "warmup": 1, "steps": 2},
    "epoch": {"pair": ("resnet8x4", "resnet8"), "train_images": 64, "test_images": 16, "batch": 8,
              "warmup_steps": 1},
}

# name: (bf16 autocast, channels_last, torch.compile), resolved by the engine like a run's runtime.
VARIANTS: dict[str, tuple[bool, bool, bool]] = {
    "fp32": (False, False, False),
    "channels_last": (False, True, False),
    "bf16": (True, False, False),
    "bf16+cl": (True, True, False),  # the engine's automatic CUDA runtime
    "bf16+cl+compile": (True, True, True),  # ... with runtime.compile on
}

# Tolerance of every loss term against fp32, per variant and device type, as a fraction of the whole
# loss of its role in that step (the number the engine back-propagates): a small term's error counts
# for what it adds to the gradient, and the rounding of a near-zero term is not magnified. Why these:
# - channels_last is the same fp32 arithmetic summed in another order (NHWC kernels): rounding-level
#   differences, ~1e-7 per op. On CUDA, cuDNN runs other algorithms for NHWC than for NCHW (TF32 is
#   switched off for this check so both really are fp32), hence a decade more room there.
# - bf16 keeps 8 significant bits, a relative rounding of 2^-8 ~ 0.4% per rounded op; CUDA autocast runs
#   convolutions and matmuls in bf16 with fp32 accumulation and softmax/log_softmax/exp/sum/losses in
#   fp32. Logits rounded to bf16 and losses in fp32 move KD's loss by ~1e-4 to 1e-3 of the role's loss
#   (resnet32x4 -> resnet8x4, measured on the CPU with the losses upcast). 1e-2 passes that with a
#   decade of room and fails a loss computed in bf16 (a KL of bf16 log-probabilities is off by 10-30%
#   at τ = 4: ~5e-2 of the role's loss).
# - compiled (bf16): inductor fuses ops and keeps fp32 intermediates inside a kernel; the difference
#   from eager stays within bf16's rounding, so the bf16 tolerance.
# - None: measured and printed, not enforced. CPU autocast keeps softmax and log_softmax in bf16 (they are
#   not on its fp32 list, unlike CUDA's), so on CPU the KD terms under bf16 are off by up to ~30% unless
#   the losses upcast their logits; the engine never picks bf16 on a CPU (runtime.amp auto = off there).
TOLERANCES: dict[str, dict[str, float | None]] = {
    "channels_last": {"cpu": 1e-5, "cuda": 1e-4},
    "bf16": {"cpu": None, "cuda": 1e-2},
    "bf16+cl+compile": {"cpu": None, "cuda": 1e-2},
}


# ----------------------------------------------------------------------------------------------
# Time budget


class Budget:
    """Deadlines for the sections: each gets its share of the time still left."""

    def __init__(self, total_s: float, shares: dict[str, float]) -> None:
        self.start = time.perf_counter()
        self.total_s = total_s
        self.pending = dict(shares)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def section_deadline(self, name: str) -> float:
        left = max(self.total_s - self.elapsed(), 0.0)
        weight = self.pending.pop(name, 0.0)
        share = weight / (weight + sum(self.pending.values())) if weight else 0.0
        return time.perf_counter() + left * share


class HardBudgetExceeded(BaseException):
    """Not an Exception: the per-cell ``except Exception`` that keeps one failure from hiding the
    other results must not swallow the end of the budget."""


def _alarm(signum: int, frame: Any) -> None:
    raise HardBudgetExceeded


@contextlib.contextmanager
def hard_limit(seconds: float) -> Iterator[None]:
    """End the run at ``seconds`` even inside a long compile (SIGALRM; the main thread of a Unix process)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(max(int(math.ceil(seconds)), 1))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------------------------
# Shared pieces


def registered_methods() -> list[str]:
    from reproduce.methods.base import registered

    return [cls.name for cls in registered()]


def variant_runtime(variant: str, device: torch.device) -> Runtime:
    amp, channels_last, compile = VARIANTS[variant]
    return benchmark_runtime(device, amp=amp, channels_last=channels_last, compile=compile)


def pair_config(pair: tuple[str, str], **sections: Any):
    teacher, student = pair
    return config_from_dict({"models": {"teacher": teacher, "student": student}, **sections})


def mib(count: int) -> float:
    return count / 2**20


def peak_memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """True fp32 on CUDA (no TF32 convolutions or matmuls) and fixed cuDNN algorithms: the reference
    a lower-precision variant is measured against."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.allow_tf32, cudnn.benchmark, matmul.allow_tf32)
    cudnn.allow_tf32, cudnn.benchmark = False, False
    # Matmuls are already fp32 by default; writing the flag anyway would change inductor's cache key
    # (its matmul precision reads "ieee" instead of "none") and cost the later sections a recompile.
    if matmul.allow_tf32:
        matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, cudnn.benchmark = saved[:2]
        if matmul.allow_tf32 != saved[2]:
            matmul.allow_tf32 = saved[2]


# ----------------------------------------------------------------------------------------------
# 1. The CUDA-only tests


def cuda_test_files(directory: Path) -> list[Path]:
    """Test files that mention CUDA at all; in them, the CUDA-only tests carry "cuda" in their names."""
    return sorted(path for path in directory.glob("test_*.py") if "cuda" in path.read_text().lower())


def run_cuda_tests(settings: dict[str, Any], device: torch.device, deadline: float) -> bool:
    files = cuda_test_files(PROJECT / settings["tests"]["directory"])
    if not files:
        print("FAIL no test file under tests/ mentions CUDA")
        return False
    command = [sys.executable, "-m", "pytest", *map(str, files), "-q", "-rs", "-p", "no:cacheprovider",
               "-k", settings["tests"]["keyword"]]
    print("$ python", " ".join(str(Path(part).relative_to(PROJECT)) if part.startswith(str(PROJECT)) else part
                                for part in command[1:]), flush=True)
    try:
        # A dry run is a CPU run: its CUDA tests skip there even on a machine that has a GPU.
        environment = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if device.type == "cpu" else {})}
        result = subprocess.run(command, cwd=PROJECT, env=environment, timeout=max(deadline - time.perf_counter(), 1.0))
    except subprocess.TimeoutExpired:
        print("FAIL the CUDA tests ran past their share of the budget")
        return False
    if result.returncode == 5:
        print(f"FAIL no test named *{settings['tests']['keyword']}* in {', '.join(f.name for f in files)}")
        return False
    print("ok" if result.returncode == 0 else f"FAIL pytest exited {result.returncode}")
    return result.returncode == 0


# ----------------------------------------------------------------------------------------------
# 2. Loss equivalence


@dataclasses.dataclass
class Comparison:
    """How far a variant's loss terms are from the fp32 reference's (see TOLERANCES for the measure)."""

    variant: str
    tolerance: float | None  # None: not enforced
    worst: float = 0.0
    worst_term: str = ""
    compared: int = 0
    one_sided: list[str] = dataclasses.field(default_factory=list)  # terms of a branch only one side took

    @property
    def ok(self) -> bool:
        return self.compared > 0 and (self.tolerance is None or self.worst <= self.tolerance)

    def cell(self) -> str:
        if self.tolerance is None:
            return f"{self.worst:.1e} (not enforced)"
        return f"{'ok' if self.ok else 'FAIL'} {self.worst:.1e} (tol {self.tolerance:.0e})"


def equivalence_batches(settings: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same few batches for every variant, drawn on the CPU from a fixed seed."""
    eq = settings["equivalence"]
    generator = torch.Generator().manual_seed(eq["seed"])
    size, channels, classes = settings["image_size"], settings["channels"], settings["classes"]
    return [(torch.randn(eq["batch"], channels, size, size, generator=generator),
             torch.randint(0, classes, (eq["batch"],), generator=generator)) for _ in range(eq["steps"])]


def loss_terms(method_name: str, settings: dict[str, Any], runtime: Runtime) -> dict[str, float]:
    """Every loss term of the method's first steps, ``"step<k> <role>/<term>"``, from the same
    initial weights (seeded construction) and the same batches in every runtime."""
    eq = settings["equivalence"]
    torch.manual_seed(eq["seed"])
    config = pair_config(eq["pair"], recipe={"optimizer": {"lr": eq["lr"]}})
    method, optimizers = build_for_runtime(method_name, config, settings["classes"], settings["channels"], runtime)
    memory_format = torch.channels_last if runtime.channels_last else torch.contiguous_format
    terms: dict[str, float] = {}
    for index, (x, y) in enumerate(equivalence_batches(settings), start=1):
        torch.manual_seed(eq["seed"] + index)  # a method that draws in its step (R2KD's CutMix) draws the same
        x = x.to(runtime.device).contiguous(memory_format=memory_format)
        step = train_step(method, optimizers, x, y.to(runtime.device), 1, runtime)
        for role, losses in step.losses.items():
            for term, value in losses.items():
                terms[f"step{index} {role}/{term}"] = float(value.detach().float())
    return terms


def compare_losses(reference: dict[str, float], candidate: dict[str, float], variant: str,
                   tolerance: float | None) -> Comparison:
    """Worst ``|candidate - reference|`` of any term over the size of the reference loss of its role in
    that step (the sum of the role's terms' magnitudes, all named ``"step<k> <role>/..."``)."""
    role_loss: dict[str, float] = {}
    for key, value in reference.items():
        group = key.split("/", 1)[0]
        role_loss[group] = role_loss.get(group, 0.0) + abs(value)
    comparison = Comparison(variant, tolerance)
    comparison.one_sided = sorted(set(reference) ^ set(candidate))
    for key in sorted(set(reference) & set(candidate)):
        scale = max(role_loss[key.split("/", 1)[0]], 1e-12)
        error = abs(candidate[key] - reference[key]) / scale if math.isfinite(candidate[key]) else math.inf
        comparison.compared += 1
        if error > comparison.worst or comparison.worst_term == "":
            comparison.worst, comparison.worst_term = error, key
    return comparison


def check_equivalence(method_name: str, variants: list[str], settings: dict[str, Any], device: torch.device,
                      tolerances: dict[str, float | None] | None = None) -> list[Comparison]:
    """``method_name``'s loss terms under each variant against fp32. ``tolerances`` overrides TOLERANCES."""
    tolerances = tolerances or {}
    with exact_fp32():
        reference = loss_terms(method_name, settings, variant_runtime("fp32", device))
        comparisons = []
        for variant in variants:
            tolerance = tolerances[variant] if variant in tolerances else TOLERANCES[variant][device.type]
            candidate = loss_terms(method_name, settings, variant_runtime(variant, device))
            comparisons.append(compare_losses(reference, candidate, variant, tolerance))
    return comparisons


def run_equivalence(settings: dict[str, Any], methods: list[str], device: torch.device, deadline: float) -> bool:
    variants = [v for v in settings["equivalence"]["variants"] if settings["with_compile"] or not VARIANTS[v][2]]
    skipped_compile = [v for v in settings["equivalence"]["variants"] if v not in variants]
    pair = settings["equivalence"]["pair"]
    print(f"{settings['equivalence']['steps']} steps of batch {settings['equivalence']['batch']}, {pair[0]} -> "
          f"{pair[1]}, {settings['image_size']}x{settings['image_size']}; worst error of any loss term vs fp32, "
          f"as a fraction of its role's loss"
          + (f"; {', '.join(skipped_compile)} left out (no compile)" if skipped_compile else ""))
    print(f"{'method':12s} " + " ".join(f"{v:>26s}" for v in variants))
    torch._dynamo.reset()
    ok = True
    for name in methods:
        if time.perf_counter() > deadline:
            print(f"{name:12s} " + " ".join(f"{'SKIPPED (budget)':>26s}" for _ in variants))
            ok = False
            continue
        try:
            comparisons = check_equivalence(name, variants, settings, device)
        except Exception as error:  # one method's failure must not hide the others' results
            print(f"{name:12s} ERROR {type(error).__name__}: {error}")
            traceback.print_exc(limit=3)
            ok = False
            continue
        print(f"{name:12s} " + " ".join(f"{c.cell():>26s}" for c in comparisons), flush=True)
        for comparison in comparisons:
            if not comparison.ok:
                print(f"    {comparison.variant}: worst term {comparison.worst_term!r}"
                      + ("" if comparison.compared else " (no term in common)"))
            if comparison.one_sided:
                print(f"    note {comparison.variant}: a data-dependent branch went the other way; terms on one "
                      f"side only: {', '.join(comparison.one_sided)}")
            ok &= comparison.ok
    return ok


# ----------------------------------------------------------------------------------------------
# 3. Throughput


@dataclasses.dataclass
class Cell:
    images_per_s: float | None = None
    peak_bytes: int | None = None
    note: str = ""  # instead of a number: "-" (not measured here), "budget", "ERROR"

    def rate(self) -> str:
        return self.note or f"{self.images_per_s:.0f}"

    def memory(self) -> str:
        return "-" if self.peak_bytes is None else f"{mib(self.peak_bytes):.0f}"


def measure_cell(method_name: str, pair: tuple[str, str], batch: int, variant: str, settings: dict[str, Any],
                 device: torch.device) -> Cell:
    runtime = variant_runtime(variant, device)
    peak_memory_reset(device)
    method, optimizers = build_for_runtime(method_name, pair_config(pair), settings["classes"], settings["channels"],
                                           runtime)
    x, y = random_batch(batch, settings["channels"], settings["image_size"], settings["classes"], runtime)
    tp = settings["throughput"]
    rate = steps_per_second(method, optimizers, x, y, runtime, warmup=tp["warmup"], steps=tp["steps"], repeats=1)
    return Cell(batch * rate, peak_memory(device))


def run_throughput(settings: dict[str, Any], methods: list[str], device: torch.device, deadline: float) -> bool:
    tp = settings["throughput"]
    variants = tp["variants"]
    print(f"images/s of train_step ({tp['warmup']} warm-up + {tp['steps']} timed steps per cell), "
          f"{settings['channels']}x{settings['image_size']}x{settings['image_size']}, {settings['classes']} classes; "
          f"peak MiB = torch.cuda.max_memory_allocated")
    header = (f"{'pair':24s} {'batch':>5s} {'method':10s} " + " ".join(f"{v:>16s}" for v in variants)
              + "   peak MiB " + "/".join(variants))
    print(header)
    ok = True
    largest: tuple[int, str] = (0, "")
    torch.backends.cudnn.benchmark = True  # as the engine's (non-deterministic) training runs have it
    for pair in settings["pairs"]:
        for batch in tp["batches"]:
            torch._dynamo.reset()  # each block compiles its own graphs: no recompile limit across blocks
            for name in methods:
                cells = []
                for variant in variants:
                    if VARIANTS[variant][2] and (not settings["with_compile"] or batch not in tp["compile_batches"]):
                        cells.append(Cell(note="-"))
                    elif time.perf_counter() > deadline:
                        cells.append(Cell(note="budget"))
                    else:
                        try:
                            cells.append(measure_cell(name, pair, batch, variant, settings, device))
                        except Exception as error:
                            print(f"ERROR {name} {variant} batch {batch}: {type(error).__name__}: {error}")
                            cells.append(Cell(note="ERROR"))
                            ok = False
                print(f"{pair[0] + '->' + pair[1]:24s} {batch:5d} {name:10s} "
                      + " ".join(f"{c.rate():>16s}" for c in cells)
                      + "   " + "/".join(c.memory() for c in cells), flush=True)
                for variant, cell in zip(variants, cells):
                    if cell.peak_bytes is not None and cell.peak_bytes > largest[0]:
                        largest = (cell.peak_bytes, f"{pair[0]}->{pair[1]} batch {batch} {name} {variant}")
    if largest[1]:
        print(f"largest peak memory: {mib(largest[0]):.0f} MiB ({largest[1]})")
    if time.perf_counter() > deadline:
        print("note: cells marked 'budget' did not fit in this section's share of --budget-s")
    return ok


# ----------------------------------------------------------------------------------------------
# 4. One CIFAR-100-shaped epoch, and the GPU's utilisation


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


def time_epoch(settings: dict[str, Any], prepared_root: Path, device: torch.device, compile: bool) -> None:
    from reproduce.data.loader import make_loaders
    from reproduce.data.prepare import load_prepared

    ep = settings["epoch"]
    config = pair_config(ep["pair"], dataset={"name": "cifar100", "prepared_root": str(prepared_root),
                                              "val_fraction": 0.0}, recipe={"batch_size": ep["batch"]})
    # The runtime a training run resolves on this machine by default (bf16 + channels_last on CUDA).
    runtime = resolve_runtime(RuntimeConfig(device=str(device), compile="on" if compile else "off"))
    prepared = load_prepared(config.dataset.prepared_dir)
    peak_memory_reset(device)
    train_batches, _ = make_loaders(prepared, config.dataset, batch_size=ep["batch"],
                                    eval_batch_size=config.recipe.eval_batch_size, device=runtime.device, seed=0,
                                    channels_last=runtime.channels_last, num_workers=0)
    method, optimizers = build_for_runtime(ep["method"], config, prepared.num_classes, prepared.in_channels, runtime)
    name = (f"{ep['method']} {ep['pair'][0]}->{ep['pair'][1]}, {'bf16' if runtime.amp_dtype else 'fp32'}"
            f"{' + channels_last' if runtime.channels_last else ''}{' + compile' if runtime.compile else ''}")

    started = time.perf_counter()
    for index, (x, y) in enumerate(train_batches.epoch(0)):  # another shuffle than the timed epoch's
        if index == ep["warmup_steps"]:
            break
        train_step(method, optimizers, x, y, 1, runtime)
    sync(device)
    warmup_s = time.perf_counter() - started

    steps = len(train_batches)
    with GpuSampler(device) as sampler:
        started = time.perf_counter()
        for index, (x, y) in enumerate(train_batches.epoch(1)):
            set_learning_rates(optimizers, config.recipe, 1, index / steps)
            train_step(method, optimizers, x, y, 1, runtime, index)
        sync(device)
        seconds = time.perf_counter() - started
    peak = peak_memory(device)
    print(f"{name}: epoch of {len(prepared.train.labels)} images ({steps} steps of {ep['batch']}) "
          f"{seconds:.2f} s, {steps * ep['batch'] / seconds:.0f} img/s; warm-up ({ep['warmup_steps']} step(s)"
          f"{', compile' if runtime.compile else ''}) {warmup_s:.1f} s; "
          f"peak memory (data resident + training) {'-' if peak is None else f'{mib(peak):.0f} MiB'}")
    print(f"    {sampler.summary()}", flush=True)


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
                time_epoch(settings, root, device, compile)
            except Exception as error:
                print(f"ERROR epoch (compile {compile}): {type(error).__name__}: {error}")
                traceback.print_exc(limit=3)
                ok = False
    return ok


# ----------------------------------------------------------------------------------------------
# The check


SECTIONS = ("tests", "equivalence", "throughput", "epoch")


def describe(device: torch.device, settings: dict[str, Any], dry_run: bool) -> None:
    where = "CPU" if device.type == "cpu" else torch.cuda.get_device_name(device)
    extra = ""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        extra = (f", {mib(properties.total_memory) / 1024:.0f} GiB, CUDA {torch.version.cuda}, cuDNN "
                 f"{torch.backends.cudnn.version()}, bf16 {torch.cuda.is_bf16_supported()}")
    print(f"gpu-check{' (dry run)' if dry_run else ''}: {where}{extra}; torch {torch.__version__}; budget "
          f"{settings['budget_s']:.0f} s (hard stop at +{settings['hard_grace_s']:.0f} s); compile "
          f"{'on' if settings['with_compile'] else 'off'}", flush=True)


def run(settings: dict[str, Any], sections: list[str], methods: list[str], device: torch.device) -> bool:
    budget = Budget(settings["budget_s"], {name: share for name, share in settings["shares"].items() if name in sections})
    results: dict[str, bool] = {}
    for name in SECTIONS:
        if name not in sections:
            continue
        deadline = budget.section_deadline(name)
        started = time.perf_counter()
        print(f"\n== {name} (until +{deadline - budget.start:.0f} s)", flush=True)
        if name == "tests":
            results[name] = run_cuda_tests(settings, device, deadline)
        elif name == "equivalence":
            results[name] = run_equivalence(settings, methods, device, deadline)
        elif name == "throughput":
            results[name] = run_throughput(settings, methods, device, deadline)
        else:
            results[name] = run_epoch(settings, device, deadline)
        print(f"-- {name}: {'ok' if results[name] else 'FAILED'} in {time.perf_counter() - started:.1f} s "
              f"(total {budget.elapsed():.1f} s)", flush=True)
    print(f"\ngpu-check: {'ok' if all(results.values()) else 'FAILED: ' + ', '.join(n for n, r in results.items() if not r)}"
          f" in {budget.elapsed():.1f} s")
    return all(results.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="toy sizes, any device (CPU without CUDA)")
    parser.add_argument("--with-compile", action="store_true", help="also the compiled variants in a dry run")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled variants")
    parser.add_argument("--budget-s", type=float, help=f"wall-clock budget (default {SETTINGS['budget_s']:.0f})")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--methods", nargs="+", help="default: every registered method")
    args = parser.parse_args(argv)

    settings = deep_merge(SETTINGS, DRY_RUN_OVERRIDES) if args.dry_run else deep_merge(SETTINGS, {})
    if args.with_compile or args.no_compile:
        settings["with_compile"] = not args.no_compile
    if args.budget_s is not None:
        settings["budget_s"] = args.budget_s
    if not torch.cuda.is_available() and not args.dry_run:
        print("gpu-check needs a CUDA GPU and none is available (torch.cuda.is_available() is False). "
              "Run it on a machine with one, or `python -m benchmarks.gpu_check --dry-run` to exercise the "
              "same code paths on this one at toy sizes.", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    methods = args.methods or registered_methods()
    unknown = sorted(set(methods) - set(registered_methods()))
    if unknown:
        parser.error(f"unknown methods {', '.join(unknown)}; registered: {', '.join(registered_methods())}")
    describe(device, settings, args.dry_run)
    # A "compiled" number must never be an eager one: dynamo's silent fallback at its recompile limit
    # is made an error instead. The limit itself is raised because every method of a block reuses the
    # compiled graphs of one code object (SplitNet.forward) for its own mix of architectures, modes and
    # grad settings; a training run compiles far fewer.
    dynamo = torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=32)
    try:
        with hard_limit(settings["budget_s"] + settings["hard_grace_s"]), dynamo:
            return 0 if run(settings, args.sections, methods, device) else 1
    except HardBudgetExceeded:
        print(f"\ngpu-check: FAILED: the hard budget ({settings['budget_s'] + settings['hard_grace_s']:.0f} s) "
              f"ran out; raise --budget-s or run fewer --sections", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
