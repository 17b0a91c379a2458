"""Training throughput (images/s) of one method step, per network pair, input size and runtime option.

    python -m benchmarks.throughput                       # the embedded default pair on this device
    python -m benchmarks.throughput --pairs resnet32x4:resnet8x4 --size 32 --methods kd dml
    python -m benchmarks.throughput --loader              # device-resident loader vs torch DataLoader

Each figure is the median of ``--repeats`` timed windows after warm-up, with a CUDA synchronise
before every clock read so the queued kernels are counted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from reproduce import models
from reproduce.config import AugmentConfig, config_from_dict
from reproduce.data.loader import DeviceLoader, Normalise
from reproduce.data.prepare import Split
from reproduce.engine import make_optimizer
from reproduce.methods.base import Networks, build_method


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def method_throughput(method_name: str, teacher: str, student: str, size: int, channels: int, classes: int,
                      batch: int, device: torch.device, steps: int, repeats: int, channels_last: bool,
                      amp: bool) -> float:
    def create(arch: str) -> nn.Module:
        return models.create(arch, classes, in_channels=channels)

    def pretrained() -> nn.Module:
        return create(teacher).requires_grad_(False).eval()

    config = config_from_dict({})
    method = build_method(config, method_name, Networks(teacher, student, classes, channels, create, pretrained))
    method.to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    method.to(memory_format=memory_format)
    optimizers = {role: make_optimizer(module, config.recipe.optimizer) for role, module in method.roles().items()}
    x = torch.randn(batch, channels, size, size, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, classes, (batch,), device=device)
    method.train()

    def step() -> None:
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            result = method.step(x, y, epoch=1)
        update = sorted(result.update) if result.update is not None else sorted(optimizers)
        sum(sum(result.losses[r].values()) for r in update if r in result.losses).backward()
        for role in update:
            optimizers[role].step()

    for _ in range(3):
        step()
    rates = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        rates.append(batch * steps / (time.perf_counter() - start))
    return statistics.median(rates)


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
