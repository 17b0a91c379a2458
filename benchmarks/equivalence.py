"""Loss equivalence (`make gpu-check`, section "equivalence"): for every registered method, the loss terms of
its first training steps under channels_last, bf16 autocast, and bf16 + channels_last + torch.compile (the
engine's CUDA runtime with compile on), each against plain fp32 from the same weights and data."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import traceback
from collections.abc import Iterator
from typing import Any

import torch

from benchmarks.workload import benchmark_runtime, build_workload
from reproduce.config import config_from_dict
from reproduce.runtime import Runtime

# name: (bf16 autocast, channels_last, torch.compile), resolved by the engine like a run's runtime.
VARIANTS: dict[str, tuple[bool, bool, bool]] = {
    "fp32": (False, False, False),
    "channels_last": (False, True, False),
    "bf16": (True, False, False),
    "bf16+cl": (True, True, False),  # the engine's automatic CUDA runtime
    "bf16+cl+compile": (True, True, True),  # ... with runtime.compile on
    "fp32+compile": (False, False, True),  # a CPU's compiled runtime (the dry run's)
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


def variant_runtime(variant: str, device: torch.device) -> Runtime:
    amp, channels_last, compile = VARIANTS[variant]
    return benchmark_runtime(device, amp=amp, channels_last=channels_last, compile=compile)


def pair_config(pair: tuple[str, str], **sections: Any):
    teacher, student = pair
    return config_from_dict({"models": {"teacher": teacher, "student": student}, **sections})


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
    memory_format = torch.channels_last if runtime.channels_last else torch.contiguous_format
    batches = [(x.to(runtime.device).contiguous(memory_format=memory_format), y.to(runtime.device))
               for x, y in equivalence_batches(settings)]
    workload = build_workload(method_name, config, settings["classes"], settings["channels"], runtime,
                              batches[0][0][:2])
    terms: dict[str, float] = {}
    for index, (x, y) in enumerate(batches, start=1):
        torch.manual_seed(eq["seed"] + index)  # a method that draws in its step (R2KD's CutMix) draws the same
        step = workload.step(x, y)
        for role, losses in step.losses.items():
            gate = step.gates.get(role)
            if gate is not None and not bool(gate):
                continue  # a role gated off this step (SwitOKD's paused teacher): its losses are not used
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
