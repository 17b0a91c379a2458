"""Training throughput (images/s) of the engine's training step (``reproduce.train_step``), per
method, network pair, input size and runtime option.

    python -m benchmarks.throughput                       # the embedded default pair on this device
    python -m benchmarks.throughput --pairs resnet32x4:resnet8x4 --size 32 --methods kd dml
    python -m benchmarks.throughput --loader              # device-resident loader vs torch DataLoader

Each figure is the median of ``--repeats`` timed windows after warm-up, with a CUDA synchronise
before every clock read so the queued kernels are counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from torch import nn

from reproduce.methods.base import build_method
from reproduce.runtime import Runtime, resolve_runtime
from reproduce.train import make_optimizer, train, train_step
from reproduce.train.build import make_networks
from reproduce.config import AugmentConfig, Config, RuntimeConfig, config_from_dict
from reproduce.data.loader import DeviceLoader, Normalise
from reproduce.data.prepare import Split
from reproduce.methods.base import Method


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_runtime(device: torch.device, *, amp: bool, channels_last: bool, compile: bool) -> Runtime:
    """The engine's runtime for explicit switches (resolved by the engine, as a training run's would be)."""
    return resolve_runtime(RuntimeConfig(device=str(device), amp="bf16" if amp else "off",
                                                channels_last="on" if channels_last else "off",
                                                compile="on" if compile else "off"))


def build_for_runtime(method_name: str, config: Config, classes: int, channels: int, runtime: Runtime,
                      ) -> tuple[Method, dict[str, torch.optim.Optimizer]]:
    """The method and its optimisers placed, formatted and compiled as ``train`` does.

    Offline methods get a randomly initialised, frozen teacher of ``models.teacher`` instead of the
    trained checkpoint: the cost of a step and the numerics of its losses do not depend on what the
    teacher learned, and a benchmark must not need a trained run on disk."""
    networks = make_networks(config, classes, channels, runtime.device)

    def random_frozen_teacher() -> nn.Module:
        return networks.fresh_teacher().requires_grad_(False).eval()

    method = build_method(config, method_name, dataclasses.replace(networks, load_teacher=random_frozen_teacher))
    method.to(runtime.device)
    if runtime.channels_last:
        method.to(memory_format=torch.channels_last)
    optimizers = {role: make_optimizer(module, config.recipe.optimizer_for(role))
                  for role, module in method.roles().items()}
    if runtime.compile:
        for network in method.eval_networks().values():
            network.compile()
    method.train()
    return method, optimizers


def random_batch(batch: int, channels: int, size: int, classes: int, runtime: Runtime,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised-looking inputs in the memory format the engine's loaders hand out."""
    memory_format = torch.channels_last if runtime.channels_last else torch.contiguous_format
    x = torch.randn(batch, channels, size, size, device=runtime.device).contiguous(memory_format=memory_format)
    return x, torch.randint(0, classes, (batch,), device=runtime.device)


def steps_per_second(method: Method, optimizers: dict[str, torch.optim.Optimizer], x: torch.Tensor,
                     y: torch.Tensor, runtime: Runtime, *, warmup: int, steps: int, repeats: int) -> float:
    """Median over ``repeats`` windows of ``steps`` engine training steps, after ``warmup`` untimed
    ones (where a compiled network compiles)."""
    for _ in range(warmup):
        train_step(method, optimizers, x, y, 1, runtime)
    rates = []
    for _ in range(repeats):
        _sync(runtime.device)
        start = time.perf_counter()
        for _ in range(steps):
            train_step(method, optimizers, x, y, 1, runtime)
        _sync(runtime.device)
        rates.append(steps / (time.perf_counter() - start))
    return statistics.median(rates)


def method_throughput(method_name: str, teacher: str, student: str, size: int, channels: int, classes: int,
                      batch: int, device: torch.device, steps: int, repeats: int, channels_last: bool,
                      amp: bool, compile: bool = False) -> float:
    """Images/s of ``train_step`` for one method, pair and runtime."""
    runtime = benchmark_runtime(device, amp=amp, channels_last=channels_last, compile=compile)
    config = config_from_dict({"models": {"teacher": teacher, "student": student}})
    method, optimizers = build_for_runtime(method_name, config, classes, channels, runtime)
    x, y = random_batch(batch, channels, size, classes, runtime)
    return batch * steps_per_second(method, optimizers, x, y, runtime, warmup=3, steps=steps, repeats=repeats)


def loader_throughput(size: int, batch: int, device: torch.device, n: int = 8192) -> dict[str, float]:
    """Images/s of producing augmented, normalised batches: on-device vs a CPU DataLoader."""
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,))
    normalise = Normalise([0.5] * 3, [0.25] * 3, device, channels_last=False)
    resident = DeviceLoader(Split(images, labels), batch_size=batch, normalise=normalise, device=device, seed=0,
                            train=True, augment=AugmentConfig(crop_padding=4, flip=True))
    _sync(device)
    start = time.perf_counter()
    count = sum(len(y) for _, y in resident.epoch(1))
    _sync(device)
    rates = {"device-resident": count / (time.perf_counter() - start)}

    import torchvision.transforms.v2 as T
    from torch.utils.data import DataLoader, Dataset

    class Tensors(Dataset):
        transform = T.Compose([T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(),
                               T.ToDtype(torch.float32, scale=True), T.Normalize([0.5] * 3, [0.25] * 3)])

        def __len__(self) -> int:
            return n

        def __getitem__(self, index: int):
            return self.transform(images[index]), labels[index]

    start = time.perf_counter()
    count = 0
    for x, y in DataLoader(Tensors(), batch_size=batch, shuffle=True, num_workers=2, drop_last=True):
        x.to(device)
        count += len(y)
    _sync(device)
    rates["DataLoader (2 workers)"] = count / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=["resnet8x4:resnet8"], help="teacher:student pairs")
    parser.add_argument("--methods", nargs="+", default=["vanilla", "kd", "dml"])
    parser.add_argument("--size", type=int, default=8, help="input height/width (digits 8, CIFAR 32)")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--loader", action="store_true", help="also compare the data loaders")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [("fp32", False, False), ("fp32 channels_last", True, False)]
    if device.type == "cuda":
        variants.append(("bf16 channels_last", True, True))
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch}, input {args.channels}x{args.size}x{args.size}")
    print(f"{'pair':28s} {'method':10s} " + " ".join(f"{name:>20s}" for name, _, _ in variants))
    for pair in args.pairs:
        teacher, student = pair.split(":")
        for method in args.methods:
            rates = [method_throughput(method, teacher, student, args.size, args.channels, args.classes, args.batch,
                                       device, args.steps, args.repeats, channels_last, amp)
                     for _, channels_last, amp in variants]
            print(f"{pair:28s} {method:10s} " + " ".join(f"{rate:16.0f} img/s" for rate in rates), flush=True)
    if args.loader:
        for name, rate in loader_throughput(32, args.batch, device).items():
            print(f"loader {name:24s} {rate:10.0f} img/s (32x32, crop+flip+normalise)")


if __name__ == "__main__":
    main()
