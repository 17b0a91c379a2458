"""Counting what a piece of training code asks of the device: aten ops dispatched, and host syncs.

``count_dispatch()`` is a ``TorchDispatchMode``: it counts every aten op (a proxy for kernel launches on
a GPU) and every host sync, a point where Python reads a value that lives on the training device and so
must wait for the device to finish everything queued before it:

- ``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``, ``if t:``, ``F.one_hot``'s check);
- a copy from the device to the host (``.cpu()``, ``.tolist()`` of a GPU tensor);
- ``Tensor.tolist()`` and ``Tensor.numpy()``, which read CPU memory without dispatching.

On a GPU every such read of a GPU tensor counts. On the CPU nothing needs a sync, so what counts there is
a read of a value that depends on the training state: on any tensor that existed before the block (the
batch, the weights, the optimiser's state, the epoch's sums) or was computed from one. Those are the reads
a GPU would wait for. A value made inside the block from Python numbers alone (R2KD's CutMix box, drawn from
torch's CPU generator) is host data on either device and is not counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

_SCALAR_READ = torch.ops.aten._local_scalar_dense.default
_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}
# Fresh tensors made from Python values (torch.tensor(3.0)): host data, whatever their inputs look like.
_FRESH = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}


@dataclass
class Counts:
    ops: int = 0
    syncs: int = 0
    where: Counter = field(default_factory=Counter)  # what synced: op name -> count

    def per(self, steps: int) -> tuple[float, float]:
        return self.ops / steps, self.syncs / steps


class _CountingMode(TorchDispatchMode):
    def __init__(self, counts: Counts, host: WeakIdKeyDictionary) -> None:
        super().__init__()
        self.counts, self.host = counts, host

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        self.counts.ops += 1
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        if func is _SCALAR_READ and _training_data(inputs[0], self.host):
            self._sync(func)
        elif func in _COPIES and _device_to_host(func, args, kwargs):
            self._sync(func)
        out = func(*args, **kwargs)
        host = func in _FRESH or all(t in self.host for t in inputs)  # made from host values only
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, Tensor):
                if host:
                    self.host[tensor] = True
                else:  # including an in-place op's target that was host data until now
                    self.host.pop(tensor, None)
        return out

    def _sync(self, func: Any) -> None:
        self.counts.syncs += 1
        self.counts.where[str(func.overloadpacket.__name__)] += 1


def _training_data(tensor: Tensor, host: WeakIdKeyDictionary) -> bool:
    return tensor.device.type != "cpu" or tensor not in host


def _device_to_host(func: Any, args: tuple, kwargs: dict) -> bool:
    if func is torch.ops.aten.copy_.default:  # copy_(destination, source)
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    destination = kwargs.get("device")
    return args[0].device.type != "cpu" and destination is not None and torch.device(destination).type == "cpu"


@contextmanager
def count_dispatch() -> Iterator[Counts]:
    """Count the aten ops and host syncs of the code inside the block (see the module docstring)."""
    counts = Counts()
    host: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensors made inside the block from Python values
    reads = {name: getattr(Tensor, name) for name in ("tolist", "numpy")}

    def counted(name: str) -> Any:
        def read(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.device.type == "cpu" and self not in host:  # a device tensor's read is counted as its copy
                counts.syncs += 1
                counts.where[name] += 1
            return reads[name](self, *args, **kwargs)
        return read

    for name in reads:
        setattr(Tensor, name, counted(name))
    try:
        with _CountingMode(counts, host):
            yield counts
    finally:
        for name, original in reads.items():
            setattr(Tensor, name, original)
