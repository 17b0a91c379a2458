"""One training step, top to bottom: the page a method author reads.

A method computes named losses per role (reproduce/methods/base.py); this file turns them into one
update of every role the step asks to update."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reproduce.distributed import Replicas
from reproduce.methods.base import Method, Step
from reproduce.runtime import Runtime


class DivergedError(RuntimeError):
    """A loss became NaN or infinite: training stops at once (the last good checkpoint stays)."""


def train_step(method: Method, optimizers: dict[str, torch.optim.Optimizer], x: Tensor, y: Tensor, epoch: int,
               runtime: Runtime, index: int | None = None, replicas: Replicas | None = None) -> Step:
    """One optimisation step, top to bottom: the method's losses, one backward, the updated roles step.

    Every peer target is detached inside the losses, so the sum of the updated roles' losses has
    gradients only in their own parameters; a role left out of ``step.update`` gets no gradient, no
    momentum and no weight decay. ``index`` (the step within the epoch) only names the step in errors.
    ``replicas`` (torchrun, reproduce/distributed.py) averages the updated roles' gradients over the ranks."""
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    with torch.autocast(runtime.device.type, dtype=runtime.amp_dtype or torch.float32,
                        enabled=runtime.amp_dtype is not None):
        step = method.step(x, y, epoch)
    _check_finite(step, method, epoch, index)
    update = _roles_to_update(step.update, optimizers)
    total = sum(sum(step.losses[role].values()) for role in update if role in step.losses)
    if torch.is_tensor(total):  # zero when no role trains this step
        total.backward()
    if replicas is not None:  # the ranks' mean gradient; the roles' agreement checked if the method names them
        replicas.average_gradients(update, check=step.update is not None)
    for role in update:
        optimizers[role].step()
    return step


def _check_finite(step: Step, method: Method, epoch: int, index: int | None) -> None:
    terms = [(role, term, value) for role, losses in step.losses.items() for term, value in losses.items()]
    if not terms:
        return
    # One host sync per step: the price of stopping at the step that diverged, before it is applied.
    if bool(torch.stack([value.detach().float() for _, _, value in terms]).isfinite().all()):
        return
    role, term, value = next((r, t, v) for r, t, v in terms if not bool(v.detach().float().isfinite()))
    where = f"epoch {epoch}" + (f", step {index + 1}" if index is not None else "")
    raise DivergedError(f"training diverged at {where}: method {method.name}, role {role}, loss term {term!r} is "
                        f"{float(value.detach())}. Lower the learning rate (recipe.optimizer.lr or recipe.roles.{role}.lr), "
                        f"or the method's coefficients; the last good checkpoint is kept")


def _roles_to_update(requested: frozenset[str] | None, optimizers: dict[str, Any]) -> list[str]:
    roles = sorted(optimizers) if requested is None else sorted(requested)
    unknown = set(roles) - set(optimizers)
    if unknown:
        raise KeyError(f"step asked to update unknown roles {sorted(unknown)}; roles are {sorted(optimizers)}")
    return roles
