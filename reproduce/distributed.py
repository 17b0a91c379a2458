"""What the rest of the code needs from torch.distributed, written so that a single process needs none of it."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """The mean of ``tensor`` over every rank (the tensor itself in a single process). Methods use it for
    decisions that every rank must take alike, e.g. SwitOKD's mode from the global batch's statistics."""
    if not is_distributed():
        return tensor
    averaged = tensor.detach().clone()
    dist.all_reduce(averaged, op=dist.ReduceOp.SUM)
    return averaged / dist.get_world_size()
