"""``runtime.compile: on``: the whole training step compiled, and evaluation compiled apart.

The step's two parts (reproduce/train/step.py) are each one ``torch.compile``'d function:

- ``losses``: the method's step under autocast (every network it calls, including the parts AEKT and SOKD
  call directly: ``features``, ``head``) and the sum of the losses; AOTAutograd compiles its backward with
  it, so ``total.backward()`` runs compiled kernels;
- ``update``: every role's optimiser step (the multi-tensor code, fused by Inductor into a few kernels),
  gated updates included.

Between them stay the backward call and, under torchrun, the gradient all-reduce. Shapes are static
(``dynamic=False``: training batches all have one size); nothing that changes between steps or epochs is a
Python constant to the compiler: the epoch is a 0-d tensor (reproduce/train/loop.py), the learning rates are
tensors filled in place (reproduce/train/optim.py), SwitOKD's mode is a tensor. So the graphs compiled in the
first steps serve the whole run (tested: no recompilation in the second epoch). On CUDA the losses' graph is
also captured as a CUDA graph (``mode="reduce-overhead"``: one launch replays the step's hundreds of kernels);
the tally copies a step's outputs before the next replay overwrites them.

Evaluation compiles each evaluated network separately (``compile_networks``), so the training graph is never
the one evaluation runs, nor the other way round; its last, smaller batch gets a static graph of its own.
"""

from __future__ import annotations

import torch
from torch import nn

from reproduce.runtime import Runtime
from reproduce.train.step import losses, update


class CompiledStep:
    """The compiled ``losses`` and ``update`` of reproduce/train/step.py, for ``train_step(compiled=...)``."""

    def __init__(self, runtime: Runtime) -> None:
        cuda_graphs = runtime.device.type == "cuda" and runtime.compile_backend == "inductor"
        self.losses = torch.compile(losses, dynamic=False, backend=runtime.compile_backend,
                                    mode="reduce-overhead" if cuda_graphs else None)
        self.update = torch.compile(update, dynamic=False, backend=runtime.compile_backend)


def compile_networks(networks: dict[str, nn.Module], runtime: Runtime) -> dict[str, nn.Module]:
    """Compiled copies for evaluation (the modules are shared, not edited: training never runs these graphs)."""
    return {name: torch.compile(network, dynamic=False, backend=runtime.compile_backend)
            for name, network in networks.items()}
