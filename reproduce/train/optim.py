"""One optimiser per role, and learning rates as a pure function of training progress."""

from __future__ import annotations

import math

import torch
from torch import nn

from reproduce.config import ConfigError, OptimizerConfig, RecipeConfig, ScheduleConfig


def make_optimizer(module: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, nesterov=config.nesterov)
    if config.name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
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


def set_learning_rates(optimizers: dict[str, torch.optim.Optimizer], recipe: RecipeConfig, epoch: int,
                       fraction: float) -> None:
    for role, optimizer in optimizers.items():
        lr = learning_rate(recipe.optimizer_for(role).lr, recipe.schedule, recipe.epochs, epoch, fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr
