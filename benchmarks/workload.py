"""What the benchmarks train: a method and its optimisers placed, prepared and compiled as a training run
does (reproduce/train/loop.py), and its training step, ``reproduce.train.train_step`` itself.

Offline methods get a randomly initialised, frozen teacher of ``models.teacher`` instead of the trained
checkpoint: the cost of a step and the numerics of its losses do not depend on what the teacher learned,
and a benchmark must not need a trained run on disk.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from reproduce.config import Config, RuntimeConfig
from reproduce.methods.base import Method, Step, build_method
from reproduce.runtime import Runtime, resolve_runtime
from reproduce.train import make_optimizer, train_step
from reproduce.train.build import make_networks
from reproduce.train.compiled import CompiledStep
from reproduce.train.frozen import prepare_frozen


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_runtime(device: torch.device, *, amp: bool, channels_last: bool, compile: bool) -> Runtime:
    """The engine's runtime for explicit switches (resolved by the engine, as a training run's would be)."""
    return resolve_runtime(RuntimeConfig(device=str(device), amp="bf16" if amp else "off",
                                         channels_last="on" if channels_last else "off",
                                         compile="on" if compile else "off"))


@dataclasses.dataclass
class Workload:
    """A method ready to train on ``runtime``: ``step(x, y)`` is one ``train_step`` of it."""

    method: Method
    optimizers: dict[str, torch.optim.Optimizer]
    runtime: Runtime
    compiled: CompiledStep | None
    epoch: Tensor  # 0-d, on the device, as the loop passes it

    def step(self, x: Tensor, y: Tensor) -> Step:
        return train_step(self.method, self.optimizers, x, y, self.epoch, self.runtime, compiled=self.compiled)


class _OneBatch:
    def __init__(self, x: Tensor) -> None:
        self.x = x

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        yield self.x, self.x.new_zeros(len(self.x), dtype=torch.long)


def build_workload(method_name: str, config: Config, classes: int, channels: int, runtime: Runtime,
                   example: Tensor) -> Workload:
    """``method_name`` with ``config``'s networks, placed, formatted, its frozen teacher prepared (on the
    images ``example``) and its step compiled as ``train`` does, in train() mode."""
    networks = make_networks(config, classes, channels, runtime.device)

    def random_frozen_teacher() -> nn.Module:
        return networks.fresh_teacher().requires_grad_(False).eval()

    method = build_method(config, method_name, dataclasses.replace(networks, load_teacher=random_frozen_teacher))
    method.to(runtime.device)
    if runtime.channels_last:
        method.to(memory_format=torch.channels_last)
    prepare_frozen(method, runtime, _OneBatch(example))
    optimizers = {role: make_optimizer(module, config.recipe.optimizer_for(role), runtime)
                  for role, module in method.roles().items()}
    method.train()
    compiled = CompiledStep(runtime) if runtime.compile else None
    return Workload(method, optimizers, runtime, compiled, torch.full((), 1.0, device=runtime.device))


def random_batch(batch: int, channels: int, size: int, classes: int, runtime: Runtime) -> tuple[Tensor, Tensor]:
    """Standardised-looking inputs in the dtype and memory format the engine's loaders hand out."""
    memory_format = torch.channels_last if runtime.channels_last else torch.contiguous_format
    x = torch.randn(batch, channels, size, size, device=runtime.device).contiguous(memory_format=memory_format)
    return x.to(runtime.amp_dtype or torch.float32), torch.randint(0, classes, (batch,), device=runtime.device)


def steps_per_second(workload: Workload, x: Tensor, y: Tensor, *, warmup: int, steps: int, repeats: int) -> float:
    """Median over ``repeats`` windows of ``steps`` training steps, after ``warmup`` untimed ones (where a
    compiled step compiles), with a CUDA synchronise before every clock read so queued kernels count."""
    for _ in range(warmup):
        workload.step(x, y)
    rates = []
    for _ in range(repeats):
        sync(workload.runtime.device)
        start = time.perf_counter()
        for _ in range(steps):
            workload.step(x, y)
        sync(workload.runtime.device)
        rates.append(steps / (time.perf_counter() - start))
    return statistics.median(rates)
