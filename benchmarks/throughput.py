"""Training throughput (images/s) of the engine's training step (``reproduce.train.train_step``), per
method, network pair, input size and runtime option, beside what a step asks of the device: aten ops
dispatched (a proxy for kernel launches) and host syncs, per step.

    python -m benchmarks.throughput                       # the embedded default pair on this device
    python -m benchmarks.throughput --pairs resnet32x4:resnet8x4 --size 32 --methods kd dml
    python -m benchmarks.throughput --loader              # device-resident loader vs torch DataLoader

Each rate is the median of ``--repeats`` timed windows after warm-up (benchmarks/workload.py). Ops and
syncs are counted over ``--steps`` steps of the first variant (benchmarks/counting.py); on a CPU a "sync"
is a host read of a value computed from the training state, one that a GPU would have to wait for.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from benchmarks.counting import count_dispatch
from benchmarks.workload import Workload, benchmark_runtime, build_workload, random_batch, steps_per_second, sync
from reproduce.config import AugmentConfig, config_from_dict
from reproduce.data.loader import DeviceLoader, Normalise
from reproduce.data.prepare import Split


def workload_for(method_name: str, teacher: str, student: str, size: int, channels: int, classes: int, batch: int,
                 device: torch.device, channels_last: bool, amp: bool, compile: bool = False,
                 ) -> tuple[Workload, torch.Tensor, torch.Tensor]:
    runtime = benchmark_runtime(device, amp=amp, channels_last=channels_last, compile=compile)
    config = config_from_dict({"models": {"teacher": teacher, "student": student}})
    x, y = random_batch(batch, channels, size, classes, runtime)
    return build_workload(method_name, config, classes, channels, runtime, x[:2]), x, y


def method_throughput(method_name: str, teacher: str, student: str, size: int, channels: int, classes: int,
                      batch: int, device: torch.device, steps: int, repeats: int, channels_last: bool,
                      amp: bool, compile: bool = False) -> float:
    """Images/s of ``train_step`` for one method, pair and runtime."""
    workload, x, y = workload_for(method_name, teacher, student, size, channels, classes, batch, device,
                                  channels_last, amp, compile)
    return batch * steps_per_second(workload, x, y, warmup=3, steps=steps, repeats=repeats)


def ops_and_syncs(method_name: str, teacher: str, student: str, size: int, channels: int, classes: int, batch: int,
                  device: torch.device, steps: int) -> tuple[float, float]:
    """aten ops dispatched and host syncs per ``train_step`` (fp32, after one warm-up step), as a GPU would run
    it: a CPU's free reads of the step's gates (``Runtime.gates_on_host``) are not taken."""
    workload, x, y = workload_for(method_name, teacher, student, size, channels, classes, batch, device,
                                  channels_last=False, amp=False)
    workload.runtime = dataclasses.replace(workload.runtime, gates_on_host=False)
    workload.step(x, y)
    with count_dispatch() as counts:
        for _ in range(steps):
            workload.step(x, y)
    return counts.per(steps)


def loader_throughput(size: int, batch: int, device: torch.device, n: int = 8192) -> dict[str, float]:
    """Images/s of producing augmented, normalised batches: on-device vs a CPU DataLoader."""
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,))
    normalise = Normalise([0.5] * 3, [0.25] * 3, device, channels_last=False)
    resident = DeviceLoader(Split(images, labels), batch_size=batch, normalise=normalise, device=device, seed=0,
                            train=True, augment=AugmentConfig(crop_padding=4, flip=True))
    sync(device)
    start = time.perf_counter()
    count = sum(len(y) for _, y in resident.epoch(1))
    sync(device)
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
    sync(device)
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
    print(f"{'pair':28s} {'method':10s} {'ops/step':>9s} {'syncs/step':>10s} "
          + " ".join(f"{name:>20s}" for name, _, _ in variants))
    for pair in args.pairs:
        teacher, student = pair.split(":")
        for method in args.methods:
            shape = (method, teacher, student, args.size, args.channels, args.classes, args.batch, device)
            ops, syncs = ops_and_syncs(*shape, steps=args.steps)
            rates = [method_throughput(*shape, args.steps, args.repeats, channels_last, amp)
                     for _, channels_last, amp in variants]
            print(f"{pair:28s} {method:10s} {ops:9.0f} {syncs:10.2f} " + " ".join(f"{rate:16.0f} img/s" for rate in rates),
                  flush=True)
    if args.loader:
        for name, rate in loader_throughput(32, args.batch, device).items():
            print(f"loader {name:24s} {rate:10.0f} img/s (32x32, crop+flip+normalise)")


if __name__ == "__main__":
    main()
