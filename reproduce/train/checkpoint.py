"""Checkpoints: what is saved each epoch, what must match to resume, and loading files safely."""

from __future__ import annotations

import dataclasses
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reproduce.config import Config, ConfigError
from reproduce.io import atomic_torch_save
from reproduce.methods.base import Method
from reproduce.train.spec import RunSpec

CHECKPOINT_FORMAT = 3  # 3: loadable with weights_only=True


class CheckpointError(ConfigError):
    """A checkpoint or predictions file that cannot be read safely."""


def load_state(path: Path, what: str, fix: str) -> Any:
    """``torch.load`` of a file someone may have handed us: tensors and plain containers only, never
    code (a crafted pickle is refused), and a clear error naming the file and the fix."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: refused to load this {what}: it holds more than tensors and plain values "
                              f"({str(error).splitlines()[0]}). Files from others are never unpickled as code; "
                              f"{fix}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: this {what} is corrupt or truncated ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else 'no detail'}); {fix}") from None


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


def load_checkpoint(spec: RunSpec, config: Config, mode: str) -> dict[str, Any] | None:
    """``mode``: "auto" resumes a checkpoint written by the same config and starts fresh otherwise;
    "always" requires one; "never" ignores it."""
    path = spec.checkpoint_dir / "last.pt"
    if mode == "never" or not path.exists():
        if mode == "always":
            raise FileNotFoundError(f"--resume always: no checkpoint at {path}")
        return None
    state = load_state(path, "checkpoint", "delete it or rerun with --resume never to start this run over")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or state.get("key") != resume_key(config, spec):
        if mode == "always":
            raise ConfigError(f"{path} was written by a different configuration; rerun with --resume never "
                              f"(or --resume auto) to start over")
        print(f"[reproduce] {path} belongs to a different configuration: starting from scratch")
        return None
    return state


def save_checkpoint(path: Path, *, config: Config, spec: RunSpec, epoch: int, method: Method,
                    optimizers: dict[str, torch.optim.Optimizer], history: list[dict[str, float]],
                    best: dict[str, Any], tracker_key: Any) -> None:
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "key": resume_key(config, spec), "epoch": epoch,
                       "method": method.state_dict(),
                       "optimizers": {r: o.state_dict() for r, o in optimizers.items()},
                       "rng": rng_state(), "history": history, "best": best,
                       "tracker_key": tracker_key}, path)


def restore(state: dict[str, Any], method: Method, optimizers: dict[str, torch.optim.Optimizer]) -> None:
    method.load_state_dict(state["method"])
    for role, optimizer in optimizers.items():
        optimizer.load_state_dict(state["optimizers"][role])
    restore_rng(state["rng"])


def save_networks(method: Method, config: Config, path: Path, epoch: int) -> None:
    """The evaluated networks' weights (final.pt / best.pt), with the architectures that read them."""
    networks = method.eval_networks()
    atomic_torch_save({"epoch": epoch, "models": dataclasses.asdict(config.models),
                       "networks": {name: net.state_dict() for name, net in networks.items()}}, path)
