"""One optimiser per role, learning rates as a pure function of training progress looked up per step, and an
optimiser step kept only where a gate on the device says so (SwitOKD's paused teacher)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from reproduce.config import ConfigError, OptimizerConfig, RecipeConfig, ScheduleConfig
from reproduce.runtime import Runtime


def make_optimizer(module: nn.Module, config: OptimizerConfig, runtime: Runtime | None = None) -> torch.optim.Optimizer:
    """The role's optimiser, in the implementation that suits the runtime: torch's default on the CPU (the
    reference numbers); one fused kernel per step on CUDA; for a compiled step, the multi-tensor (foreach)
    code that Inductor fuses, with the learning rate as a tensor, so that a new rate is not a new graph."""
    params = [p for p in module.parameters() if p.requires_grad]
    options: dict[str, Any] = {}
    lr: float | torch.Tensor = config.lr
    if runtime is not None and runtime.compile:
        lr = torch.tensor(config.lr, device=runtime.device)
        options = {"foreach": True, "capturable": True} if config.name == "adamw" else {"foreach": True}
    elif runtime is not None and runtime.device.type == "cuda":
        options = {"fused": True}
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               nesterov=config.nesterov, **options)
    if config.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay, **options)
    raise ConfigError(f"recipe.optimizer.name: {config.name!r} is not one of sgd, adamw")


def learning_rate(base_lr: float, schedule: ScheduleConfig, epochs: int, epoch: int, fraction: float) -> float:
    """LR during ``epoch`` (from 1), ``fraction`` of the way through it: a pure function of progress,
    so resuming needs no scheduler state. Step decay follows CRD (×gamma once epoch > milestone)."""
    progress = epoch - 1 + fraction  # epochs completed
    if schedule.name == "step":
        factor = schedule.gamma ** sum(epoch > milestone for milestone in schedule.milestones)
    elif schedule.name == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * progress / epochs))
    else:
        raise ConfigError(f"recipe.schedule.name: {schedule.name!r} is not one of step, cosine")
    if progress < schedule.warmup_epochs:
        factor *= progress / schedule.warmup_epochs
    return base_lr * factor


class LearningRates:
    """Every role's learning rate at every step, from the recipe read once (``learning_rate`` of the role's
    base rate): ``apply`` at each step only looks a number up. An optimiser whose learning rate is a tensor
    (a compiled step's, so that a new rate is not a new graph) has it filled in place."""

    def __init__(self, base: dict[str, float], schedule: ScheduleConfig, epochs: int, steps_per_epoch: int) -> None:
        self.base, self.schedule, self.epochs, self.steps = base, schedule, epochs, steps_per_epoch
        self._epoch, self._rates = 0, {role: [] for role in base}

    @classmethod
    def for_recipe(cls, recipe: RecipeConfig, roles: list[str], steps_per_epoch: int) -> "LearningRates":
        """Each role's base rate (``recipe.roles`` over ``recipe.optimizer``) on the recipe's schedule."""
        return cls({role: recipe.optimizer_for(role).lr for role in roles}, recipe.schedule, recipe.epochs,
                   steps_per_epoch)

    def of_epoch(self, epoch: int) -> dict[str, list[float]]:
        """Each role's rate at every step of ``epoch`` (computed once per epoch)."""
        if epoch != self._epoch:
            self._epoch = epoch
            self._rates = {role: [learning_rate(base, self.schedule, self.epochs, epoch, index / self.steps)
                                  for index in range(self.steps)] for role, base in self.base.items()}
        return self._rates

    def apply(self, optimizers: dict[str, torch.optim.Optimizer], epoch: int, index: int) -> None:
        rates = self.of_epoch(epoch)
        for role, optimizer in optimizers.items():
            for group in optimizer.param_groups:
                if torch.is_tensor(group["lr"]):
                    group["lr"].fill_(rates[role][index])
                else:
                    group["lr"] = rates[role][index]

    def last_of_epoch(self, epoch: int) -> dict[str, float]:
        return {role: rates[-1] for role, rates in self.of_epoch(epoch).items()}


def gated_update(optimizer: torch.optim.Optimizer, gate: Tensor) -> None:
    """``optimizer.step()`` kept only where ``gate`` (a 0-d bool tensor) is True: otherwise its parameters and
    state are put back as they were. State this step created (SGD's momentum at its first update) goes back
    to zeros, which SGD without dampening, and AdamW, treat exactly as no state."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    existing = {(index, key) for index, p in enumerate(params) for key in optimizer.state.get(p, {})}
    before = _tensors(optimizer, params, lambda index, key: True)
    with torch.no_grad():
        kept = torch._foreach_mul(before, 1.0)  # copies, -0.0 and NaN included, in one multi-tensor op
    optimizer.step()
    created = _tensors(optimizer, params, lambda index, key: (index, key) not in existing)[len(params):]
    with torch.no_grad():
        torch._foreach_copy_(before + created, [torch.where(gate, tensor, old) for tensor, old in zip(before, kept)]
                             + [torch.where(gate, tensor, 0.0) for tensor in created])


def _tensors(optimizer: torch.optim.Optimizer, params: list[Tensor], chosen: Any) -> list[Tensor]:
    """The parameters, then the tensors of their optimiser state that ``chosen(index, key)`` picks."""
    state = [value for index, p in enumerate(params) for key, value in optimizer.state.get(p, {}).items()
             if torch.is_tensor(value) and chosen(index, key)]
    return params + state
