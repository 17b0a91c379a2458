"""Pinning a worker process to a device: the one place that decides where a fanned-out run (a recipe's,
a DVC stage's) or a sweep's worker computes and with how many CPU threads.

Devices are written as on the command line: ``auto`` (every GPU torch can see, else the CPU), ``cpu``,
or CUDA indices ``0,1,2,3``. Worker ``i`` gets ``devices[i % len(devices)]``. A GPU worker in a process
of its own sees only its GPU (``CUDA_VISIBLE_DEVICES``, set before CUDA starts there) and computes on
``cuda``; in the calling process the GPU is named instead (``cuda:1``). N workers sharing a machine
share its cores: each gets ``cores // N`` torch threads (and as many data-loader workers) unless
``runtime.threads`` sets them, since N workers each using every core would oversubscribe the CPU, and
on a CPU the thread count also picks the summation order: fix ``runtime.threads`` to compare numbers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from reproduce.errors import ConfigError

if TYPE_CHECKING:
    from reproduce.config import Config


@dataclass(frozen=True)
class WorkerSlot:
    """Where worker ``index`` runs: ``device`` "cpu", a CUDA index ("1"), or None (runtime.device as
    configured); ``threads``: its CPU threads (None: runtime.threads as configured)."""

    index: int = 0
    device: str | None = None
    threads: int | None = None

    def describe(self) -> str:
        where = "as configured" if self.device is None else "cpu" if self.device == "cpu" else f"GPU {self.device}"
        return where if self.threads is None else f"{where}, {self.threads} thread{'s' * (self.threads > 1)}"


def parse_devices(text: str | None, where: str = "--devices") -> list[str] | None:
    """``auto`` (every visible GPU, else the CPU), ``cpu``, or CUDA indices ``0,1,2``, checked against this
    machine; None stays None (not given). ``where`` names the option or key in the error."""
    if text is None:
        return None
    text = text.strip()
    if text == "cpu":
        return ["cpu"]
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if text == "auto":
        return [str(index) for index in range(count)] or ["cpu"]
    devices = [part.strip() for part in text.split(",") if part.strip()]
    if not devices or not all(device.isdigit() for device in devices):
        raise ConfigError(f"{where} {text!r}: give auto, cpu, or GPU indices such as 0,1,2")
    missing = [device for device in devices if int(device) >= count]
    if missing:
        raise ConfigError(f"{where} {text}: this machine has {count} CUDA device(s) torch can use, so no GPU "
                          f"{', '.join(missing)}; pick indices below {count}, or use cpu")
    return devices


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_slots(workers: int, devices: list[str] | None, configured_threads: int) -> list[WorkerSlot]:
    """Worker i on ``devices[i % len(devices)]`` (None: as configured), each with its share of the cores
    unless ``runtime.threads`` (``configured_threads`` > 0) sets them."""
    threads = None if configured_threads > 0 or workers == 1 else max(1, usable_cores() // workers)
    return [WorkerSlot(index, devices[index % len(devices)] if devices else None, threads) for index in range(workers)]


def pinned_config(config: Config, slot: WorkerSlot, own_process: bool) -> Config:
    """A copy of ``config`` as ``slot`` runs it: its device (``cuda`` in a process of its own, which sees
    only its GPU through ``slot_environment``; ``cuda:<i>`` in this one), its threads and loader workers."""
    config = config.model_copy(deep=True)
    if slot.threads is not None:
        config.runtime.threads = slot.threads
        if config.runtime.num_workers == 0:  # 0 = one loader worker per core of the machine: too many
            config.runtime.num_workers = slot.threads
    if slot.device == "cpu":
        config.runtime.device = "cpu"
    elif slot.device is not None:
        config.runtime.device = "cuda" if own_process else f"cuda:{slot.device}"
    return config


def slot_environment(slot: WorkerSlot, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment of a process of its own for ``slot``: ``environ`` with only the slot's GPU visible."""
    environment = dict(environ)
    if slot.device is not None and slot.device != "cpu":
        # The index counts the GPUs this process sees: GPU 1 under CUDA_VISIBLE_DEVICES=4,5 is GPU 5.
        visible = [gpu for gpu in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if gpu.strip()]
        environment["CUDA_VISIBLE_DEVICES"] = visible[int(slot.device)] if visible else slot.device
    return environment
