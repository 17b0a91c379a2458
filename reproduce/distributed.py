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

One explicit handle: ``Replicas``
    The loop creates one ``Replicas`` for the run (``make_replicas``; None in one process) and passes it to every
    training step; nothing is stored in a module global and the method's module tree is never edited. At
    creation it broadcasts rank 0's parameters and buffers of every role, so the replicas start equal. After each
    backward the step calls ``replicas.average_gradients(...)``: the roles' gradients are averaged over the
    ranks in flat buckets (about ``BUCKET_BYTES`` each, all-reduces launched together, then
    awaited), in the same order on every rank. At the end of each epoch ``replicas.share_buffers()`` gives every
    rank rank 0's BatchNorm running statistics (what DDP's per-forward buffer broadcast leaves before evaluation).

    Why this and not one ``DistributedDataParallel`` per role. DDP arms its gradient hooks in its own forward, so
    the method's ``self.student(x)`` would have to run the wrapper: either the wrapper replaces the network in the
    method's tree (``module.`` prefixes in every checkpoint, evaluation and ``end_of_training`` through DDP, and
    collectives inside an evaluation that rank 0 runs alone) or it is swapped in around each step, which is what
    this module used to do by editing torch's private ``_modules``. And a role whose method calls its parts
    (AEKT's ModuleDict of network and head, SOKD's ``self.aux.head(...)``) never passes through DDP's forward at
    all and needed a second path anyway. Averaging after the backward treats every role alike, whatever the
    method calls, keeps the networks plain modules for checkpoints, evaluation and ``torch.compile`` (the
    compiled step stops at the all-reduce and resumes after it), and is a few lines. What it gives up is DDP's
    overlap of the all-reduce with the backward: for the networks here (0.1 M to 8 M parameters, at most 32 MiB
    of gradients per step) the all-reduce is a small part of a step on NVLink or on one host's gloo.

Roles left out of an update (SwitOKD's paused teacher)
    Only the roles a step updates are averaged, and every rank must update the same roles or one rank would wait
    in an all-reduce the others never join. A method that decides on the device (SwitOKD's ``Step.gates``, from
    the global batch's statistics through ``all_reduce_mean``) updates the same roles on every rank by
    construction. Every step reduces every role's gradients (zeros for a role not updated), so the ranks always
    send the same tensors, plus a count of the ranks updating each role; a method that names its roles in
    Python (``Step.update``) reads that count every step (one host sync, for those methods only) and raises
    if the ranks disagree, instead of leaving the ranks with different weights.

SyncBatchNorm (``runtime.sync_batchnorm``)
    The roles' BatchNorm layers are converted when the replicas are made (frozen ones, like a pre-trained teacher's, are
    left alone), so that in training they normalise with the global batch's statistics and their running
    statistics are the one-process run's. On CUDA this is ``torch.nn.SyncBatchNorm``; elsewhere, where torch's
    SyncBatchNorm refuses to run, ``AllReduceBatchNorm`` does the same with one all-reduce of the per-channel
    sums in the forward and one in the backward. Parameters and buffers are kept, so the optimisers and the
    checkpoints are unaffected. Without it, each rank normalises with its own shard's statistics, and rank 0's
    running statistics are the ones evaluated and saved (``share_buffers``).

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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

if TYPE_CHECKING:
    from reproduce.methods.base import Method
    from reproduce.runtime import Runtime

BUCKET_BYTES = 25 * 2**20  # gradients per all-reduce (DDP's default bucket size)


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
        for name, child in list(parent.named_children()):
            if id(child) in chosen:
                if id(child) not in replacements:
                    replacements[id(child)] = _synchronised(child, sync_class)
                setattr(parent, name, replacements[id(child)])  # nn.Module.__setattr__ re-registers the child
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
# The handle the loop passes to every step


class Replicas:
    """The method's roles replicated over the ranks of one torchrun job (see the module docstring)."""

    def __init__(self, method: "Method", device: torch.device) -> None:
        self.names = sorted(method.roles())
        self.roles = method.roles()
        self.device = device
        self._flags: dict[frozenset[str], Tensor] = {}  # on the device, made once per set of updated roles
        with torch.no_grad(), explain_failures("broadcast of the initial weights"):
            for module in self.roles.values():
                for tensor in module.state_dict().values():
                    dist.broadcast(tensor, src=0)

    def average_gradients(self, updated: list[str], check: bool) -> None:
        """After the backward: every rank's gradients become their mean over the ranks. Every role is reduced
        (a parameter without a gradient counts as zero), so every rank sends the same tensors whatever it
        updates; with them goes a count of the ranks updating each role. ``check`` (a method that names its
        roles in ``Step.update``) reads that count: one host sync, and an error on every rank that sees the
        ranks disagree (a rank left waiting elsewhere then finds its peer gone at its next collective)."""
        params = [p for role in self.names for p in self.roles[role].parameters() if p.requires_grad]
        buckets = _buckets(params)
        flats = [torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
                 for bucket in buckets]
        key = frozenset(updated)
        if key not in self._flags:
            self._flags[key] = torch.tensor([float(role in key) for role in self.names], device=self.device)
        updating = self._flags[key].clone()
        with explain_failures("gradient all-reduce"):
            pending = [dist.all_reduce(flat, async_op=True) for flat in [*flats, updating]]
            for work in pending:
                work.wait()
        world = dist.get_world_size()
        for bucket, flat in zip(buckets, flats):
            flat /= world
            for p, grad in zip(bucket, flat.split([p.numel() for p in bucket])):
                p.grad = grad.view_as(p)
        if check:
            disputed = [role for role, count in zip(self.names, updating.tolist()) if 0 < count < world]
            if disputed:
                raise RuntimeError(f"the ranks disagree on whether to update role(s) {disputed} this step; a "
                                   f"method's step.update must be the same on every rank: decide from statistics "
                                   f"of the global batch (reproduce.distributed.all_reduce_mean), not of a rank's "
                                   f"shard")

    def share_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank, once per epoch."""
        with torch.no_grad(), explain_failures("broadcast of the buffers"):
            for module in self.roles.values():
                for buffer in module.buffers():
                    dist.broadcast(buffer, src=0)


def _buckets(params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    """Consecutive parameters of one dtype, about BUCKET_BYTES per bucket."""
    buckets: list[list[nn.Parameter]] = []
    size = 0
    for p in params:
        if not buckets or p.dtype != buckets[-1][0].dtype or size + p.numel() * p.element_size() > BUCKET_BYTES:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel() * p.element_size()
    return buckets


def make_replicas(method: "Method", runtime: "Runtime", *, sync_batchnorm: bool, quiet: bool) -> Replicas | None:
    """Under torchrun: synchronise the roles' BatchNorm if asked, then the replicas' handle. In one process: None."""
    if runtime.world_size <= 1:
        return None
    if not is_distributed():
        raise RuntimeError("WORLD_SIZE > 1 but no process group is initialised (resolve_runtime creates it)")
    converted = convert_sync_batchnorm(method, runtime.device) if sync_batchnorm else 0
    replicas = Replicas(method, runtime.device)
    if runtime.is_main and not quiet:
        print(f"[reproduce] DDP: {runtime.world_size} ranks ({dist.get_backend()}), roles "
              f"{', '.join(sorted(replicas.roles))}; the global batch is world_size x recipe.batch_size and the "
              f"learning rate is used as given (scale it yourself)"
              + (f"; {converted} BatchNorm layers synchronised" if sync_batchnorm else ""), flush=True)
    return replicas
