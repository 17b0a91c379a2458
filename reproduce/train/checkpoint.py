"""Checkpoints: what is saved each epoch, what must match to resume, and loading files safely.

``last.pt`` holds what resuming needs and nothing that can be rebuilt: the networks that never change (a
frozen, pre-trained teacher, reproduce/train/frozen.py) are reloaded from their source on resume and only
their sha256 is saved, so that a resumed run refuses a teacher that changed. The state is copied to the
host on the training thread and written by ``BackgroundWriter`` on another, atomically (a temporary file,
then a rename); the loop waits for one write before it starts the next, and before it leaves."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reproduce.config import Config, ConfigError
from reproduce.io import atomic_torch_save
from reproduce.methods.base import Method
from reproduce.models.pretrained import read_checkpoint
from reproduce.train.frozen import digest as frozen_digest
from reproduce.train.spec import RunSpec

CHECKPOINT_FORMAT = 4  # 3: loadable with weights_only=True; 4: without the frozen networks (their digest)


class CheckpointError(ConfigError):
    """A checkpoint or predictions file that cannot be read safely."""


def load_state(path: Path, what: str, fix: str) -> Any:
    """A file someone may have handed us, through the suite's one reader (``read_checkpoint``): tensors and
    plain containers only, never code (a crafted pickle is refused), and a clear error naming the file, whether
    it is corrupt or refused, and the fix."""
    return read_checkpoint(path, what, fix, refused_fix=fix, error=CheckpointError)


def rng_state() -> dict[str, Any]:
    """Every generator's state in types that ``torch.load(weights_only=True)`` accepts."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_key(config: Config, spec: RunSpec) -> dict[str, Any]:
    """What must match for a checkpoint to be continued: everything but how the run is executed."""
    resolved = config.to_dict()
    for volatile in ("runtime", "tracking", "sweep", "analysis", "pipeline"):
        resolved.pop(volatile)
    resolved["methods"] = {spec.method: resolved["methods"].get(spec.method, {})}
    return {"method": spec.method, "seed": spec.seed, "config": resolved}


def continues(state: Any, config: Config, spec: RunSpec) -> bool:
    """Whether ``state`` (a loaded last.pt) is this run's to continue: this format, written by this config."""
    return (isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT
            and state.get("key") == resume_key(config, spec))


def load_checkpoint(spec: RunSpec, config: Config, mode: str) -> dict[str, Any] | None:
    """``mode``: "auto" resumes a checkpoint written by the same config and starts fresh otherwise;
    "always" requires one; "never" ignores it."""
    path = spec.checkpoint_dir / "last.pt"
    if mode == "never" or not path.exists():
        if mode == "always":
            raise FileNotFoundError(f"--resume always: no checkpoint at {path}")
        return None
    state = load_state(path, "checkpoint", "delete it or rerun with --resume never to start this run over")
    if not continues(state, config, spec):
        if mode == "always":
            raise ConfigError(f"{path} was written by a different configuration; rerun with --resume never "
                              f"(or --resume auto) to start over")
        print(f"[reproduce] {path} belongs to a different configuration: starting from scratch")
        return None
    return state


def checkpoint_state(*, config: Config, spec: RunSpec, epoch: int, method: Method,
                     optimizers: dict[str, torch.optim.Optimizer], history: list[dict[str, float]],
                     best: dict[str, Any], tracker_key: Any, frozen: list[nn.Module]) -> dict[str, Any]:
    """``last.pt``'s content, copied to the host now: training may go on while a thread writes it."""
    return host_copy({"format": CHECKPOINT_FORMAT, "key": resume_key(config, spec), "epoch": epoch,
                      "method": trainable_state(method, frozen), "frozen": frozen_digest(frozen),
                      "optimizers": {r: o.state_dict() for r, o in optimizers.items()},
                      "rng": rng_state(), "history": list(history), "best": dict(best), "tracker_key": tracker_key})


def trainable_state(method: Method, frozen: list[nn.Module]) -> dict[str, Any]:
    """The method's state dict without the frozen networks' tensors (wherever they appear: SOKD's branch
    shares its frozen teacher's trunk)."""
    shared = {id(tensor) for network in frozen for tensor in network.state_dict(keep_vars=True).values()}
    return {key: value for key, value in method.state_dict(keep_vars=True).items() if id(value) not in shared}


def restore(state: dict[str, Any], method: Method, optimizers: dict[str, torch.optim.Optimizer],
            frozen: list[nn.Module], path: Path) -> None:
    if state["frozen"] != frozen_digest(frozen):
        raise CheckpointError(f"{path}: the frozen teacher loaded now is not the one this run trained with (its "
                              f"sha256 differs); point the teacher back at that file, or rerun with --resume never")
    left_out = set(method.state_dict()) - set(trainable_state(method, frozen))
    missing, unexpected = method.load_state_dict(state["method"], strict=False)
    if unexpected or set(missing) - left_out:
        raise CheckpointError(f"{path}: this checkpoint does not fit the method's networks (missing "
                              f"{sorted(set(missing) - left_out)[:3]}, unexpected {sorted(unexpected)[:3]}); rerun "
                              f"with --resume never")
    for role, optimizer in optimizers.items():
        optimizer.load_state_dict(state["optimizers"][role])
    restore_rng(state["rng"])


def host_copy(value: Any) -> Any:
    """``value`` with every tensor copied to the host (containers rebuilt, everything else shared)."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: host_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(host_copy(item) for item in value)
    return value


class BackgroundWriter:
    """Runs write jobs on a thread, one at a time: ``submit`` waits for the previous job, ``wait`` before the
    files are read or the run ends. A job's error is raised by the next ``submit`` or ``wait``."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()

        def run() -> None:
            try:
                job()
            except BaseException as error:  # re-raised on the training thread
                self._error = error

        self._thread = threading.Thread(target=run, name="checkpoint-writer")
        self._thread.start()

    def wait(self, raise_error: bool = True) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error


def save_networks(networks: dict[str, dict[str, Any]], config: Config, path: Path, epoch: int) -> None:
    """The evaluated networks' weights (final.pt / best.pt, from ``{name: state_dict}``), with the
    architectures that read them."""
    atomic_torch_save({"epoch": epoch, "models": config.models.model_dump(), "networks": networks}, path)
