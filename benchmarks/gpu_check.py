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
4. costs        host syncs per step for every method (target 0), kernel launches per step eager and
                compiled (profiler), and the compile time with a cold Inductor cache
                (benchmarks/step_costs.py).
5. epoch        one 50,000-image CIFAR-100-shaped epoch of KD: generated uint8 data written in the
                CIFAR release format, prepared by the suite, resident on the GPU in its DeviceLoader;
                the suite's epoch against its compute floor (target <= 1.15), the 240-epoch run projected
                from it (target < 15 min), peak memory and nvidia-smi's utilisation (benchmarks/epoch.py).

Every figure is printed beside its target. Only a GPU gives the real numbers; the dry run exercises the
same code at toy sizes on a CPU (tests/test_gpu_check.py).

Exit status: 0 every check passed; 1 a check failed or could not finish within the budget; 2 no CUDA
GPU (without --dry-run).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.epoch import peak_memory, peak_memory_reset, run_epoch
from benchmarks.equivalence import VARIANTS, pair_config, run_equivalence, variant_runtime
from benchmarks.step_costs import run_costs
from benchmarks.workload import build_workload, random_batch, steps_per_second
from reproduce.config import deep_merge

PROJECT = Path(__file__).resolve().parent.parent

SETTINGS: dict[str, Any] = {
    # Wall-clock cap of the whole check. Sections stop starting new cells at their deadline (a share
    # of the time still left, so time one section does not use rolls over to the next); an alarm at
    # budget_s + hard_grace_s ends the run whatever it is doing. 420 + 45 s stays under 8 minutes.
    "budget_s": 420.0,
    "hard_grace_s": 45.0,
    # The checks (tests, equivalence) get room to finish; what they leave rolls over to the measurements.
    "shares": {"tests": 0.2, "equivalence": 0.3, "throughput": 0.2, "costs": 0.15, "epoch": 0.15},
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
    # The KD recipe's pair and batch; syncs counted in the engine's automatic CUDA runtime.
    "costs": {"method": "kd", "pair": ("resnet32x4", "resnet8x4"), "batch": 64, "steps": 5, "variant": "bf16+cl",
              "compiled_variant": "bf16+cl+compile"},
    "epoch": {"method": "kd", "pair": ("resnet32x4", "resnet8x4"), "train_images": 50_000,
              "test_images": 10_000, "batch": 64, "warmup_steps": 10, "compile": [False, True]},
}

# The same code paths at sizes a CPU runs in seconds; compile only with --with-compile.
DRY_RUN_OVERRIDES: dict[str, Any] = {
    "budget_s": 420.0,
    "with_compile": False,
    "image_size": 8,
    "classes": 10,
    "pairs": [("resnet8x4", "resnet8")],
    "equivalence": {"pair": ("resnet8x4", "resnet8"), "batch": 8},
    "throughput": {"batches": [8], "compile_batches": [8], "warmup": 1, "steps": 2},
    "costs": {"pair": ("resnet8x4", "resnet8"), "batch": 8, "steps": 2, "variant": "fp32",
              "compiled_variant": "fp32+compile"},
    # Two warm-up steps: a compiled step compiles its optimiser's graph again once the momentum exists.
    "epoch": {"pair": ("resnet8x4", "resnet8"), "train_images": 64, "test_images": 16, "batch": 8,
              "warmup_steps": 2},
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


def mib(count: int) -> float:
    return count / 2**20


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
# 3. Throughput (sections 2, equivalence, and 4, costs, and 5, epoch: benchmarks/equivalence.py, step_costs.py, epoch.py)


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
    x, y = random_batch(batch, settings["channels"], settings["image_size"], settings["classes"], runtime)
    work = build_workload(method_name, pair_config(pair), settings["classes"], settings["channels"], runtime, x[:2])
    tp = settings["throughput"]
    rate = steps_per_second(work, x, y, warmup=tp["warmup"], steps=tp["steps"], repeats=1)
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
# The check


SECTIONS = ("tests", "equivalence", "throughput", "costs", "epoch")


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
        elif name == "costs":
            results[name] = run_costs(settings, methods, device, deadline)
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
    if device.type == "cpu":  # a dry run: on a shared CPU, compiled kernels' spinning OpenMP threads cost 20-50x
        torch.set_num_threads(1)
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
