"""Where a run executes: the device, the numeric options (AMP, channels_last, compile), the DDP rank,
and seeding. ``resolve_runtime`` turns params.yaml's ``runtime`` section ("auto" and friends) into
concrete choices for this machine once, at the start of a run."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from reproduce import distributed
from reproduce.config import ConfigError, RuntimeConfig


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    compile: bool
    rank: int = 0
    world_size: int = 1
    compile_backend: str = "inductor"  # torch.compile's backend (the tests check the capture with "aot_eager")
    # An eager step reads its device decisions (``Step.gates``) on the host: on by default on a CPU, where a
    # read is free and spares the gated role's backward; off, the step runs as on a GPU, which never waits
    # for one (what the sync-counting tests and benchmarks measure).
    gates_on_host: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_runtime(config: RuntimeConfig) -> Runtime:
    """Turn the "auto" settings into concrete ones for this machine (and this DDP rank)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if config.device == "auto":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device: CUDA was requested but is not available; use runtime.device=auto or cpu")
    cuda = device.type == "cuda"
    # bf16 autocast is ~30x slower than fp32 on CPU: never an automatic choice there.
    amp = {"auto": torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None,
           "bf16": torch.bfloat16, "off": None}
    switches = {"auto": cuda, "on": True, "off": False}
    for key, value, allowed in (("amp", config.amp, amp), ("channels_last", config.channels_last, switches),
                                ("compile", config.compile, switches)):
        if value not in allowed:
            raise ConfigError(f"runtime.{key}: {value!r} is not one of {', '.join(allowed)}")
    if world_size > 1:
        if cuda and device.index is None:  # runtime.device=cuda under torchrun: this rank's GPU, not GPU 0
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        distributed.init_process_group(device, config.ddp_timeout_s)
    return Runtime(device, amp[config.amp], switches[config.channels_last], switches[config.compile], rank, world_size,
                   gates_on_host=not cuda)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
