"""What one training step costs the device beyond its arithmetic (`make gpu-check`, section "costs"):

- host syncs per step, for every registered method (target: 0): a read of a device value makes the CPU
  wait for the GPU, which then idles while Python prepares the next step (benchmarks/counting.py);
- kernel launches per step, eager and compiled, from the profiler (CUDA kernels; on a CPU, aten ops): a
  CIFAR step is launch-bound, each launch costing a few microseconds however small the kernel;
- the compile time with a cold Inductor cache (a fresh cache directory): what the first run on a new
  machine pays before its first compiled step, and whether the graphs are stable enough to cache.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.counting import count_dispatch
from benchmarks.equivalence import pair_config, variant_runtime
from benchmarks.workload import Workload, build_workload, random_batch, sync

SYNC_TARGET = 0


def workload(method_name: str, settings: dict[str, Any], variant: str, device: torch.device,
             ) -> tuple[Workload, torch.Tensor, torch.Tensor]:
    costs = settings["costs"]
    runtime = variant_runtime(variant, device)
    x, y = random_batch(costs["batch"], settings["channels"], settings["image_size"], settings["classes"], runtime)
    return build_workload(method_name, pair_config(costs["pair"]), settings["classes"], settings["channels"], runtime,
                          x[:2]), x, y


def syncs_per_step(method_name: str, settings: dict[str, Any], device: torch.device) -> tuple[float, float]:
    """(host syncs, aten ops) per step in the engine's automatic runtime of ``device``, after a warm-up step,
    as a GPU runs it (without a CPU's free reads of the step's gates, ``Runtime.gates_on_host``)."""
    work, x, y = workload(method_name, settings, settings["costs"]["variant"], device)
    work.runtime = dataclasses.replace(work.runtime, gates_on_host=False)
    work.step(x, y)
    steps = settings["costs"]["steps"]
    with count_dispatch() as counts:
        for _ in range(steps):
            work.step(x, y)
    ops, syncs = counts.per(steps)
    return syncs, ops


def launches_per_step(work: Workload, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Kernels the profiler sees per step (CUDA kernels on a GPU, CPU ops on a CPU), after two warm-up steps."""
    for _ in range(2):
        work.step(x, y)
    sync(work.runtime.device)
    cuda = work.runtime.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            work.step(x, y)
        sync(work.runtime.device)
    events = [event for event in profiler.events() if (event.device_type.name == "CUDA") == cuda]
    if not cuda:  # CPU: top-level aten ops only (an op's own sub-ops are not separate launches)
        events = [event for event in events if event.name.startswith("aten::") and event.cpu_parent is None]
    return len(events) / steps


def cold_compile_seconds(method_name: str, settings: dict[str, Any], device: torch.device) -> float:
    """Seconds to the end of the first three compiled steps (every graph the step needs, the optimiser's
    with its state) with an empty Inductor cache, against the same steps once compiled."""
    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="inductor-cold-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        torch._dynamo.reset()
        try:
            work, x, y = workload(method_name, settings, settings["costs"]["compiled_variant"], device)
            started = time.perf_counter()
            for _ in range(3):
                work.step(x, y)
            sync(device)
            return time.perf_counter() - started
        finally:
            torch._dynamo.reset()
            if saved is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved


def run_costs(settings: dict[str, Any], methods: list[str], device: torch.device, deadline: float) -> bool:
    costs = settings["costs"]
    print(f"host syncs per step (target {SYNC_TARGET}) and aten ops per step, {costs['variant']}, batch {costs['batch']}, "
          f"{costs['pair'][0]} -> {costs['pair'][1]}")
    ok = True
    for name in methods:
        if time.perf_counter() > deadline:
            print(f"{name:12s} SKIPPED (budget)")
            ok = False
            continue
        syncs, ops = syncs_per_step(name, settings, device)
        verdict = "ok" if syncs <= SYNC_TARGET else "FAIL"
        print(f"{name:12s} syncs/step {syncs:5.2f} {verdict:4s} ops/step {ops:6.0f}", flush=True)
        ok &= syncs <= SYNC_TARGET
    method = costs["method"]
    variants = [costs["variant"]] + ([costs["compiled_variant"]] if settings["with_compile"] else [])
    for variant in variants:
        if time.perf_counter() > deadline:
            print(f"launches ({variant}): SKIPPED (budget)")
            continue
        torch._dynamo.reset()
        work, x, y = workload(method, settings, variant, device)
        what = "CUDA kernels" if device.type == "cuda" else "top-level CPU ops"
        print(f"{method} {variant}: {launches_per_step(work, x, y, costs['steps']):.0f} {what} per step", flush=True)
    if settings["with_compile"] and time.perf_counter() < deadline:
        seconds = cold_compile_seconds(method, settings, device)
        print(f"{method} {costs['compiled_variant']}: first 3 steps with a cold Inductor cache {seconds:.1f} s", flush=True)
    return ok
