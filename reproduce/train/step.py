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
so it gets no update, no momentum and no weight decay, without the host ever reading the decision. On a
CPU, where reading it costs nothing, the eager step reads it instead (``Runtime.gates_on_host``,
``decided_roles``): a role gated off is then left out of the backward and its optimiser does not step, as under
``Step.update``: the same result without the gated role's backward (SwitOKD's expert steps).

Nothing here reads a value back from the device. A NaN or infinite loss is not checked here: the loop
records every loss term of every step on the device (reproduce/train/tally.py) and raises ``DivergedError``
at the end of the epoch, naming the first step, role and term that went non-finite. The steps after it run
on (with NaN weights), and that epoch is never recorded or checkpointed, so the last good checkpoint, the
previous epoch's, is what stays on disk.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from reproduce.distributed import Replicas
from reproduce.methods.base import Method, Step
from reproduce.runtime import Runtime
from reproduce.train.optim import gated_update

if TYPE_CHECKING:
    from reproduce.train.compiled import CompiledStep


class DivergedError(RuntimeError):
    """A loss became NaN or infinite: the run stops at the end of that epoch (the last good checkpoint stays)."""


def train_step(method: Method, optimizers: dict[str, torch.optim.Optimizer], x: Tensor, y: Tensor,
               epoch: int | Tensor, runtime: Runtime, replicas: Replicas | None = None,
               compiled: CompiledStep | None = None) -> Step:
    """One optimisation step of every role the method's step updates; returns the method's ``Step``.
    ``compiled`` (``runtime.compile``, reproduce/train/compiled.py) runs the same two parts compiled."""
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    step, total = (compiled.losses if compiled else losses)(method, tuple(optimizers), x, y, epoch, runtime)
    if total is not None:  # None when no role trains this step
        total.backward()
    roles, gates = decided_roles(step, optimizers, runtime, eager=compiled is None)
    if replicas is not None:  # the ranks' mean gradient; their agreement checked when the roles are decided here
        replicas.average_gradients(roles, check=step.update is not None or gates is not step.gates)
    (compiled.update if compiled else update)(optimizers, tuple(roles), gates)
    return step


def losses(method: Method, roles: tuple[str, ...], x: Tensor, y: Tensor, epoch: int | Tensor,
           runtime: Runtime) -> tuple[Step, Tensor | None]:
    """The method's step under autocast, and the sum of the losses of the roles it updates."""
    with torch.autocast(runtime.device.type, dtype=runtime.amp_dtype or torch.float32,
                        enabled=runtime.amp_dtype is not None):
        step = method.step(x, y, epoch)
    updated, _ = decided_roles(step, roles, runtime, eager=not torch.compiler.is_compiling())
    total = sum(sum(step.losses[role].values()) for role in updated if role in step.losses)
    return step, total if torch.is_tensor(total) else None


def update(optimizers: dict[str, torch.optim.Optimizer], roles: tuple[str, ...], gates: dict[str, Tensor]) -> None:
    """Every updated role's optimiser steps; a gated role's step is kept only where its gate is on."""
    for role in roles:
        if role in gates:
            gated_update(optimizers[role], gates[role])
        else:
            optimizers[role].step()


def decided_roles(step: Step, roles: Iterable[str], runtime: Runtime,
                  eager: bool) -> tuple[list[str], dict[str, Tensor]]:
    """The roles whose losses enter the backward and whose optimisers step, and the gates left to apply on
    the device. An eager step with ``runtime.gates_on_host`` (a CPU's) reads the gates here and drops the roles
    gated off; otherwise, and in a compiled step, every gate stays on the device."""
    updated = roles_to_update(step, roles)
    if not step.gates or not eager or not runtime.gates_on_host:
        return updated, step.gates
    return [role for role in updated if role not in step.gates or bool(step.gates[role])], {}


def roles_to_update(step: Step, roles: Iterable[str]) -> list[str]:
    """The roles ``step`` updates (``Step.update``, or every role), checked against the method's ``roles``."""
    known = sorted(roles)
    updated = known if step.update is None else sorted(step.update)
    unknown = (set(updated) | set(step.gates)) - set(known)
    if unknown:
        raise KeyError(f"step asked to update unknown roles {sorted(unknown)}; roles are {known}")
    return updated
