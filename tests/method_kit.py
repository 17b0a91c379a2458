"""What the method tests share: tiny networks, a method built with given coefficients, a batch, and one
epoch through the engine's own ``train_epoch``. A test of a new method starts from these
(see tests/test_method_checklist.py for what every registered method is checked for)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from conftest import tiny_config
from reproduce import models
from reproduce.config import ScheduleConfig
from reproduce.methods import Method, Networks, get_method
from reproduce.runtime import Runtime
from reproduce.train import LearningRates, make_optimizer, train_epoch
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


def optimizers_for(method: Method, lr: float = 0.1) -> dict[str, torch.optim.Optimizer]:
    """SGD with momentum and weight decay per role, as a run makes them."""
    recipe = tiny_config(Path("."), Path("."), recipe={"optimizer": {"lr": lr, "momentum": 0.9,
                                                                     "weight_decay": 5e-4}}).recipe
    return {role: make_optimizer(module, recipe.optimizer_for(role)) for role, module in method.roles().items()}


def run_epoch(method: Method, optimizers: dict[str, torch.optim.Optimizer], batches: FixedBatches,
              epoch: int = 1, runtime: Runtime = CPU) -> EpochTally:
    """One epoch through the engine's ``train_epoch`` at the optimisers' own learning rates."""
    constant = ScheduleConfig(name="step", milestones=[])
    rates = LearningRates({role: optimizer.defaults["lr"] for role, optimizer in optimizers.items()}, constant,
                          epochs=epoch, steps_per_epoch=len(batches))
    return train_epoch(method, optimizers, batches, epoch, rates, runtime)


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
