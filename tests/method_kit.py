"""What the method tests share: tiny networks, a method built with given coefficients, a batch, and one
epoch through the engine's own ``train_epoch``. A test of a new method starts from these
(see tests/test_method_checklist.py for what every registered method is checked for)."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from conftest import tiny_config
from reproduce import models
from reproduce.config import ConfigError, ScheduleConfig
from reproduce.methods import Method, Networks, get_method
from reproduce.runtime import Runtime
from reproduce.train import LearningRates, RunSpec, make_optimizer, train, train_epoch
from reproduce.train.compiled import CompiledStep
from reproduce.train.tally import EpochTally

CLASSES, CHANNELS, BATCH = 10, 1, 16
CPU = Runtime(torch.device("cpu"), None, channels_last=False, compile=False)


def networks(teacher: str = "resnet8", student: str = "resnet8") -> Networks:
    """Fresh networks of 1-channel 8x8 inputs and 10 classes; the "pre-trained" teacher is a fresh one, frozen."""
    def create(arch: str) -> nn.Module:
        return models.create(arch, CLASSES, in_channels=CHANNELS)

    return Networks(teacher, student, CLASSES, CHANNELS, create, lambda: create(teacher).requires_grad_(False).eval())


def build(name: str, **params: Any) -> Method:
    """The registered method ``name`` with ``params`` over its defaults, seeded, in train() mode."""
    torch.manual_seed(0)
    method = get_method(name)
    return method(networks(), method.parse_params(params)).train()


def batch(seed: int = 0, size: int = BATCH) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, CHANNELS, 8, 8, generator=generator)
    return images, torch.randint(0, CLASSES, (size,), generator=generator)


class FixedBatches:
    """The engine's Batches protocol over fixed batches (the same every epoch)."""

    def __init__(self, *batches: tuple[Tensor, Tensor]) -> None:
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        yield from self.batches


def optimizers_for(method: Method, lr: float = 0.1, runtime: Runtime = CPU) -> dict[str, torch.optim.Optimizer]:
    """SGD with momentum and weight decay per role, as a run on ``runtime`` makes them."""
    recipe = tiny_config(Path("."), Path("."), recipe={"optimizer": {"lr": lr, "momentum": 0.9,
                                                                     "weight_decay": 5e-4}}).recipe
    return {role: make_optimizer(module, recipe.optimizer_for(role), runtime) for role, module in method.roles().items()}


def run_epoch(method: Method, optimizers: dict[str, torch.optim.Optimizer], batches: FixedBatches,
              epoch: int = 1, runtime: Runtime = CPU, compiled: CompiledStep | None = None) -> EpochTally:
    """One epoch through the engine's ``train_epoch`` at the optimisers' own (constant) learning rates."""
    constant = ScheduleConfig(name="step", milestones=[])
    rates = LearningRates({role: float(optimizer.defaults["lr"]) for role, optimizer in optimizers.items()},
                          constant, epochs=epoch, steps_per_epoch=len(batches))
    return train_epoch(method, optimizers, batches, epoch, rates, runtime, compiled=compiled)


def constant_output(network: nn.Module, probabilities: list[float]) -> None:
    """Make a SplitNet output the same logits for every input (its trunk and BN still run)."""
    logits = torch.tensor(probabilities).clamp_min(1e-30).log()
    with torch.no_grad():
        network.classifier.weight.zero_()
        network.classifier.bias.copy_(logits)


def total_loss(step: Any, role: str) -> Tensor:
    return sum(step.losses[role].values())


def trainable(method: Method, role: str) -> list[nn.Parameter]:
    return [parameter for parameter in method.roles()[role].parameters() if parameter.requires_grad]


def random_logits(seed: int, batch: int = 6, classes: int = 7, scale: float = 3.0) -> Tensor:
    return scale * torch.randn(batch, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def grads_are_none(module: nn.Module) -> bool:
    return all(parameter.grad is None for parameter in module.parameters())


def has_grads(module: nn.Module) -> bool:
    return any(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in module.parameters())


def rejects(name: str, bad: dict[str, Any]) -> None:
    """``bad`` coefficients of method ``name`` are a ConfigError naming ``methods.<name>.<key>``."""
    with pytest.raises(ConfigError, match=rf"methods\.{name}\.{next(iter(bad))}"):
        get_method(name).parse_params(bad)


def declares(name: str, display_name: str, row_order: int, bad: list[dict[str, Any]]) -> type[Method]:
    """Method ``name`` shows as ``display_name`` in row ``row_order``, and each of the ``bad`` coefficient
    settings is an error naming its key. Returns the class."""
    method_cls = get_method(name)
    assert (method_cls.display_name, method_cls.row_order) == (display_name, row_order)
    for coefficients in bad:
        rejects(name, coefficients)
    return method_cls


def read_history(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "history.tsv") as table:
        return list(csv.DictReader(table, delimiter="\t"))


def trains_and_learns(name: str, params: dict[str, Any], prepared_root: Path, tmp_path: Path,
                      teacher_runs_root: Path | None = None) -> dict[str, Any]:
    """A 3-epoch run of method ``name`` on digits: its loss falls and its student beats chance by far.
    Returns the run's summary (metrics.json)."""
    # One intra-op thread: on a shared, oversubscribed CPU two spinning threads run several times slower.
    sections: dict[str, Any] = {"recipe": {"epochs": 3}, "methods": {name: params}, "runtime": {"threads": 1}}
    if teacher_runs_root is not None:
        sections["teacher"] = {"runs_root": str(teacher_runs_root)}
    config = tiny_config(prepared_root, tmp_path, **sections)
    spec = RunSpec(name, 0, tmp_path / "runs" / name / "seed0", tmp_path / "checkpoints")
    summary = train(config, spec, track=False)
    history = read_history(spec.run_dir)
    first, last = float(history[0]["train/student/loss"]), float(history[-1]["train/student/loss"])
    assert last < first
    assert summary["last"]["test"]["student"]["top1"] > 40.0  # chance is 10%
    return summary
