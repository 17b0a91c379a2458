"""One training step, top to bottom: the page a method author reads.

A method computes named losses per role (reproduce/methods/base.py); ``train_step`` turns them into one
update of every role::

    step = method.step(x, y, epoch)           # losses per role; every peer target detached inside them
    sum(the updated roles' losses).backward() # one backward: a role's loss reaches only its own weights
    replicas.average_gradients(...)           # under torchrun only (reproduce/distributed.py)
    optimizers[role].step()                   # for every updated role; a gated role keeps it only where
                                              # its gate is on

Which roles a step updates: every role, unless the method names them in ``Step.update`` (a Python decision)
or gates one with ``Step.gates`` (a decision on the device: SwitOKD's paused teacher). A gated role's
optimiser steps as usual and its parameters and optimiser state are then put back where the gate is off,
so it gets no update, no momentum and no weight decay, without the host ever reading the decision.

Nothing here reads a value back from the device. A NaN or infinite loss is not checked here: the loop
records every loss term of every step on the device (reproduce/train/tally.py) and raises ``DivergedError``
at the end of the epoch, naming the first step, role and term that went non-finite. The steps after it run
on (with NaN weights), and that epoch is never recorded or checkpointed, so the last good checkpoint, the
previous epoch's, is what stays on disk.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reproduce.distributed import Replicas
from reproduce.methods.base import Method, Step
from reproduce.runtime import Runtime


class DivergedError(RuntimeError):
    """A loss became NaN or infinite: the run stops at the end of that epoch (the last good checkpoint stays)."""


def train_step(method: Method, optimizers: dict[str, torch.optim.Optimizer], x: Tensor, y: Tensor,
               epoch: int | Tensor, runtime: Runtime, replicas: Replicas | None = None) -> Step:
    """One optimisation step of every role the method's step updates; returns the method's ``Step``."""
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    with torch.autocast(runtime.device.type, dtype=runtime.amp_dtype or torch.float32,
                        enabled=runtime.amp_dtype is not None):
        step = method.step(x, y, epoch)
    roles = roles_to_update(step, optimizers)
    total = sum(sum(step.losses[role].values()) for role in roles if role in step.losses)
    if torch.is_tensor(total):  # zero when no role trains this step
        total.backward()
    if replicas is not None:  # the ranks' mean gradient; their agreement checked when the method names roles
        replicas.average_gradients(roles, check=step.update is not None)
    for role in roles:
        if role in step.gates:
            gated_update(optimizers[role], step.gates[role])
        else:
            optimizers[role].step()
    return step


def roles_to_update(step: Step, optimizers: dict[str, torch.optim.Optimizer]) -> list[str]:
    roles = sorted(optimizers) if step.update is None else sorted(step.update)
    unknown = (set(roles) | set(step.gates)) - set(optimizers)
    if unknown:
        raise KeyError(f"step asked to update unknown roles {sorted(unknown)}; roles are {sorted(optimizers)}")
    return roles


def gated_update(optimizer: torch.optim.Optimizer, gate: Tensor) -> None:
    """``optimizer.step()`` kept only where ``gate`` (a 0-d bool tensor) is True: otherwise its parameters and
    state are put back as they were. State this step created (SGD's momentum at its first update) goes back
    to zeros, which SGD without dampening, and AdamW, treat exactly as no state."""
    before = _tensors(optimizer)
    with torch.no_grad():
        kept = torch._foreach_mul(before, 1.0)  # copies, -0.0 and NaN included, in one multi-tensor op
    optimizer.step()
    existing = {id(tensor) for tensor in before}
    created = [tensor for tensor in _tensors(optimizer) if id(tensor) not in existing]
    with torch.no_grad():
        torch._foreach_copy_(before + created, [torch.where(gate, tensor, old) for tensor, old in zip(before, kept)]
                             + [torch.where(gate, tensor, 0.0) for tensor in created])


def _tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Every parameter of the optimiser and every tensor of its state."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = [value for p in params for value in optimizer.state.get(p, {}).values() if torch.is_tensor(value)]
    return params + state
