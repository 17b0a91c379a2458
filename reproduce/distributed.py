"""Data-parallel training over several processes (torchrun), written so that one process needs none of it.

Launch one process per GPU (gloo on CPU)::

    torchrun --standalone --nproc_per_node 4 -m reproduce train --method dml --seed 0

Batch size and learning rate
    ``recipe.batch_size`` is per rank: every step trains on a global batch of ``world_size x batch_size``
    images. The learning rate is NOT rescaled: ``recipe.optimizer.lr`` (and ``recipe.roles.<r>.lr``) applies
    as written to the global batch. A recipe tuned for a batch of B keeps its dynamics on N ranks with
    ``batch_size = B / N``; to train with a larger global batch G instead, scale the learning rate yourself,
    e.g. linearly, ``lr x G / B`` (Goyal et al., 2017), with a warm-up (``recipe.schedule.warmup_epochs``)
    for large factors. The rule behind this: a run on N ranks of b images is the one-process run with a
    batch of N*b (same images in each step, same augmentation draws; with ``runtime.sync_batchnorm`` the
    same BatchNorm statistics too), never the one-process run with a batch of b.

Data
    Every rank draws the epoch's permutation from ``(seed, epoch)`` and cuts it into global batches of
    ``world_size x batch_size``; rank r keeps every world_size-th image of each, from the r-th
    (reproduce/data/loader.py, ``DeviceLoader``). The shards are disjoint, they reshuffle every epoch, and the
    ranks' k-th batches together are the one-process k-th batch of the global size, augmented alike (the
    crops and flips are drawn for the global batch). Evaluation is not sharded: every rank evaluates the
    whole split, and only rank 0 writes files (checkpoints, history.tsv, metrics.json) and tracks (W&B, MLflow).

One DistributedDataParallel per role
    Each trainable role (``Method.roles()``) gets its own ``DistributedDataParallel``, hence its own buckets,
    whose gradient all-reduces overlap the backward, and keeps its own optimiser. The wrappers are not part
    of the method's module tree: ``wrap_roles`` builds them once, and ``role_wrappers(method)`` puts each one
    at its role's attribute path (``method.student``, ``method.peers["teacher"]``) for the forward of a
    training step only, so ``self.student(x)`` inside ``Method.step`` runs DDP's forward, which is what arms
    its gradient hooks for the backward that follows. Everything else sees the plain networks: ``state_dict``
    (no ``module.`` prefix), checkpoints, resume, evaluation (which must not run collectives: rank 0 evaluates
    alone at the end), ``end_of_training`` and ``torch.compile``; nothing ever has to be unwrapped.

Roles left out of ``step.update`` (SwitOKD's paused teacher)
    DDP reduces a role's gradients in hooks that the backward fires. A role whose forward ran through DDP but
    none of whose loss terms is backwarded fires none: nothing is reduced, its reducer simply starts over at
    the next forward, and its optimiser does not step, so it gets no update, no momentum and no weight decay
    on any rank. That is why neither ``find_unused_parameters`` (a graph traversal every step, and its "used"
    would count the paused teacher's forward anyway) nor ``no_sync`` (the decision comes after the forward)
    is used. What it needs is that every rank backwards the same roles: a role backwarded on one rank only
    would leave that rank in an all-reduce the others never join. Methods therefore decide from global
    statistics (``all_reduce_mean``: SwitOKD's mode), and ``check_same_roles`` verifies it every step (one
    all-reduce of a few integers) and raises on every rank at once if they disagree.

Roles DDP cannot see
    A role that is not a module attribute of the method with a forward of its own (AEKT's ModuleDict of
    network and head), or whose method calls its parts directly (SOKD's ``self.aux.head(...)``), never goes
    through DDP's forward, so its hooks are never armed. Such a role is noticed at its first step (its
    wrapper was not called) and from then on its gradients are averaged after the backward, one flat
    all-reduce per role: the same result, without the overlap.

SyncBatchNorm (``runtime.sync_batchnorm``)
    The roles' BatchNorm layers are converted before wrapping (frozen ones, like a pre-trained teacher's, are
    left alone), so that in training they normalise with the global batch's statistics and their running
    statistics are the one-process run's. On CUDA this is ``torch.nn.SyncBatchNorm``; elsewhere, where torch's
    SyncBatchNorm refuses to run, ``AllReduceBatchNorm`` does the same with one all-reduce of the per-channel
    sums in the forward and one in the backward. Parameters and buffers are kept, so the optimisers and the
    checkpoints are unaffected. Without it, each rank normalises with its own shard's statistics and DDP
    broadcasts rank 0's running statistics at every forward (DDP's default).

Failures
    The process group is created with ``timeout = runtime.ddp_timeout_s``: a rank that stops answering makes
    the others' next collective fail after that long instead of hanging. With gloo that error is re-raised as
    ``CollectiveTimeout``, naming the setting; with NCCL the watchdog ends the process with its own timeout
    message. A rank that dies outright closes its connections: the others' next gloo collective fails at
    once (``CollectiveError``), and torchrun stops the remaining ranks when one fails.

tests/test_ddp.py runs all of this under torchrun on 2 CPU ranks, against one process with the global batch.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

if TYPE_CHECKING:
    from reproduce.config import RuntimeConfig
    from reproduce.runtime import Runtime
    from reproduce.methods.base import Method


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """The mean of ``tensor`` over every rank (the tensor itself in a single process). Methods use it for
    decisions that every rank must take alike, e.g. SwitOKD's mode from the global batch's statistics."""
    if not is_distributed():
        return tensor
    averaged = tensor.detach().clone()
    with explain_failures("all_reduce_mean"):
        dist.all_reduce(averaged, op=dist.ReduceOp.SUM)
    return averaged / dist.get_world_size()


# ----------------------------------------------------------------------------------------------
# The process group and its failures


class CollectiveError(RuntimeError):
    """A collective failed because another rank is gone: it crashed, exited or closed its connections."""


class CollectiveTimeout(CollectiveError):
    """Another rank did not join a collective within ``runtime.ddp_timeout_s``."""


_timeout_s: float | None = None  # of the process group this module created


def init_process_group(device: torch.device, timeout_s: float) -> None:
    """The default process group for torchrun's environment: NCCL for CUDA, gloo otherwise."""
    global _timeout_s
    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL binds its communicator to the current device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    _timeout_s = timeout_s


_TIMEOUT = re.compile(r"timed out|timeout", re.IGNORECASE)
_GONE = re.compile(r"connection closed|connection reset|broken pipe", re.IGNORECASE)


@contextmanager
def explain_failures(where: str) -> Iterator[None]:
    """Re-raise a collective's failure caused by another rank (a timeout, a closed connection) as a
    ``CollectiveError`` naming this rank, the place and, for a timeout, the setting; other errors pass unchanged."""
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as error:  # gloo raises a plain RuntimeError, others a DistError (a RuntimeError)
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if not is_distributed() or not (_TIMEOUT.search(message) or _GONE.search(message)):
            raise
        who = f"rank {dist.get_rank()} of {dist.get_world_size()}"
        if _GONE.search(message):
            raise CollectiveError(f"{who}: another rank left during a collective ({where}): it crashed or exited "
                                  f"(its own log says why). {message}") from error
        limit = f"runtime.ddp_timeout_s = {_timeout_s:g} s" if _timeout_s is not None else "the process group's timeout"
        raise CollectiveTimeout(
            f"{who}: another rank did not join a collective ({where}) within {limit}: it crashed, stalled or "
            f"took longer than that between steps (rank 0 alone writes checkpoints and starts the trackers; raise "
            f"runtime.ddp_timeout_s if that is slow). {message}") from error


# ----------------------------------------------------------------------------------------------
# SyncBatchNorm


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the sum of the ranks' gradients: each rank's inputs take part in
    every rank's output."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


class AllReduceBatchNorm(_BatchNorm):
    """BatchNorm over the global batch for devices torch's SyncBatchNorm does not support (CPU with gloo).

    In training, one all-reduce of the per-channel sum, sum of squares and count (in float64, as CPU
    BatchNorm accumulates) gives the global mean and variance; autograd through the all-reduce gives every
    rank's inputs their share of the gradient of every rank's loss, as SyncBatchNorm's backward does. In
    evaluation, or in one process, it is ordinary BatchNorm."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        wide = input.double()
        count = torch.full((1,), input.numel() / input.shape[1], dtype=torch.float64, device=input.device)
        with explain_failures("SyncBatchNorm"):
            sums = _SumOverRanks.apply(torch.cat([wide.sum(dims), (wide * wide).sum(dims), count]))
        channels = input.shape[1]
        n = sums[-1]
        mean = sums[:channels] / n
        var = (sums[channels:2 * channels] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_((var * n / (n - 1).clamp_min(1)).to(self.running_var.dtype), factor)
        shape = (1, channels) + (1,) * (input.dim() - 2)
        scale = torch.rsqrt(var + self.eps)
        out = (wide - mean.view(shape)) * scale.view(shape)
        out = out.to(input.dtype)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_sync_batchnorm(method: "Method", device: torch.device) -> int:
    """Swap the roles' trainable BatchNorm layers for synchronised ones, in place (same parameters and buffers,
    so the optimisers and checkpoints are unaffected); returns how many were converted."""
    frozen = {id(module) for root in method.frozen() for module in root.modules()}
    roles = list(method.roles().values())
    sync_class: type[_BatchNorm] = nn.SyncBatchNorm if device.type == "cuda" else AllReduceBatchNorm
    chosen = {id(module): module for role in roles for module in role.modules()
              if isinstance(module, _BatchNorm) and not isinstance(module, (nn.SyncBatchNorm, AllReduceBatchNorm))
              and id(module) not in frozen and all(p.requires_grad for p in module.parameters(recurse=False))}
    replacements: dict[int, _BatchNorm] = {}
    parents = {id(parent): parent for root in [method, *roles] for parent in root.modules()}
    for parent in parents.values():
        for name, child in list(parent._modules.items()):
            if child is None or id(child) not in chosen:
                continue
            if id(child) not in replacements:
                replacements[id(child)] = _synchronised(child, sync_class)
            parent._modules[name] = replacements[id(child)]
    return len(replacements)


def _synchronised(bn: _BatchNorm, sync_class: type[_BatchNorm]) -> _BatchNorm:
    sync = sync_class(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:
        sync.weight, sync.bias = bn.weight, bn.bias
    if bn.track_running_stats:
        sync.running_mean, sync.running_var = bn.running_mean, bn.running_var
        sync.num_batches_tracked = bn.num_batches_tracked
    sync.train(bn.training)
    return sync


# ----------------------------------------------------------------------------------------------
# One DistributedDataParallel per role


class RoleDDP(DistributedDataParallel):
    """DDP for one role; counts its forwards (a role never called through it is averaged after the backward)
    and lends the wrapped network's attributes, so ``self.aux.head`` still works while it stands in."""

    def __init__(self, module: nn.Module, **kwargs: Any) -> None:
        super().__init__(module, **kwargs)
        self.calls = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        with explain_failures("DDP forward"):
            return super().forward(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


class DistributedRoles:
    """The DDP wrappers of a method's roles and where they stand in during a training step's forward."""

    def __init__(self, method: "Method", device: torch.device, quiet: bool) -> None:
        self.method_name = method.name
        self.quiet = quiet or dist.get_rank() != 0
        self.wrappers: dict[str, RoleDDP] = {}
        self.slots: dict[str, list[tuple[nn.Module, str]]] = {}
        self.averaged: dict[str, nn.Module] = {}  # roles whose gradients are averaged after the backward
        for role, module in method.roles().items():
            slots = [(parent, name) for parent in method.modules() for name, child in parent._modules.items()
                     if child is module]
            if not slots or type(module).forward is nn.Module.forward:
                self.averaged[role] = module
                self._note(role, "is not a network attribute of the method with its own forward")
                _broadcast_state(module)
                continue
            # DDP's defaults otherwise: buffers (BatchNorm's running statistics) follow rank 0 at every forward,
            # and no find_unused_parameters (see "Roles left out of step.update" above).
            self.wrappers[role] = RoleDDP(module, device_ids=[device.index] if device.type == "cuda" else None)
            self.slots[role] = slots

    def _note(self, role: str, why: str) -> None:
        if not self.quiet:
            print(f"[reproduce] DDP: role {role!r} of {self.method_name} {why}; its gradients are averaged after "
                  f"the backward (correct, without DDP's overlap)", flush=True)

    @contextmanager
    def installed(self) -> Iterator[None]:
        for role, wrapper in self.wrappers.items():
            wrapper.calls = 0
            for parent, name in self.slots[role]:
                parent._modules[name] = wrapper
        try:
            yield
        finally:
            for role, wrapper in self.wrappers.items():
                for parent, name in self.slots[role]:
                    parent._modules[name] = wrapper.module

    def average_the_rest(self, update: list[str]) -> None:
        """After the backward: average the gradients of the updated roles DDP did not reduce."""
        for role in update:
            wrapper = self.wrappers.get(role)
            if wrapper is not None and wrapper.calls == 0:
                # Never armed from now on (it is no longer installed), so its hooks cannot reduce as well.
                self.averaged[role] = self.wrappers.pop(role).module
                del self.slots[role]
                self._note(role, "is computed without calling its network (e.g. through its parts)")
            if role in self.averaged:
                average_gradients(self.averaged[role])


def _broadcast_state(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (what DDP does for the roles it wraps)."""
    with torch.no_grad(), explain_failures("broadcast of the initial weights"):
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def average_gradients(module: nn.Module) -> None:
    """Mean of the trainable parameters' gradients over the ranks, one flat all-reduce per dtype; a missing
    gradient counts as zero (every rank must send the same tensors)."""
    params = [p for p in module.parameters() if p.requires_grad]
    world = dist.get_world_size()
    for dtype in {p.dtype for p in params}:
        group = [p for p in params if p.dtype == dtype]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
        with explain_failures("gradient all-reduce"):
            dist.all_reduce(flat)
        flat /= world
        offset = 0
        for p in group:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()


_ROLES: "weakref.WeakKeyDictionary[Method, DistributedRoles]" = weakref.WeakKeyDictionary()


def wrap_roles(method: "Method", runtime: "Runtime", config: "RuntimeConfig") -> DistributedRoles | None:
    """Under torchrun: synchronise the roles' BatchNorm if asked, then build one DDP per role (see the module
    docstring). In one process: nothing (None)."""
    if runtime.world_size <= 1:
        return None
    if not is_distributed():
        raise RuntimeError("WORLD_SIZE > 1 but no process group is initialised (resolve_runtime creates it)")
    converted = convert_sync_batchnorm(method, runtime.device) if config.sync_batchnorm else 0
    roles = DistributedRoles(method, runtime.device, config.quiet)
    if runtime.is_main and not config.quiet:
        print(f"[reproduce] DDP: {runtime.world_size} ranks ({dist.get_backend()}), roles "
              f"{', '.join(sorted(method.roles()))}; the global batch is world_size x recipe.batch_size and the "
              f"learning rate is used as given (scale it yourself)"
              + (f"; {converted} BatchNorm layers synchronised" if config.sync_batchnorm else ""), flush=True)
    _ROLES[method] = roles
    return roles


@contextmanager
def role_wrappers(method: "Method") -> Iterator[None]:
    """Around ``method.step``: the roles' DDP wrappers stand in for their networks (nothing in one process)."""
    roles = _ROLES.get(method)
    if roles is None:
        yield
        return
    with roles.installed():
        yield


def after_backward(method: "Method", update: list[str]) -> None:
    """After the backward: average what DDP did not (nothing in one process)."""
    roles = _ROLES.get(method)
    if roles is not None:
        roles.average_the_rest(update)


def check_same_roles(update: list[str], roles: list[str], device: torch.device) -> None:
    """Raise on every rank at once unless every rank updates the same roles this step (otherwise one rank would
    wait for ever in an all-reduce of gradients that the others never send)."""
    flags = torch.tensor([role in update for role in roles], dtype=torch.int32, device=device)
    both = torch.cat([flags, 1 - flags])  # max of both = some rank updates the role and some rank does not
    with explain_failures("agreement on the roles to update"):
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
    split = both.tolist()
    disputed = [role for role, yes, no in zip(roles, split[:len(roles)], split[len(roles):]) if yes and no]
    if disputed:
        raise RuntimeError(f"the ranks disagree on whether to update role(s) {disputed} this step; a method's "
                           f"step.update must be the same on every rank: decide from statistics of the global "
                           f"batch (reproduce.distributed.all_reduce_mean), not of a rank's shard")
