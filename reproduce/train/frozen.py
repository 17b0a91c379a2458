"""Networks that never change during a run (a pre-trained teacher in eval mode, without a trainable
parameter): prepared once for the device, left out of checkpoints, identified by a digest.

Prepared once (``prepare_frozen``, on an accelerator): every BatchNorm that follows a convolution is folded
into it (``torch.nn.utils.fusion``: one kernel where there were two, and nothing to normalise per step) and
the network is cast to the compute dtype, so autocast does not re-cast its weights at every step. On the
CPU the network is left exactly as loaded, so that CPU runs keep their numbers (folding rounds differently,
about 1e-6 relative). A network whose BatchNorms still learn statistics in train() mode (SOKD's
``frozen_bn: train``, R2KD's pruned teacher in its code mode) is not frozen in this sense: it is not in
``Method.frozen()`` or it is in train() mode, and it is neither folded nor left out of the checkpoint.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from reproduce.data.loader import Batches
from reproduce.methods.base import Method
from reproduce.runtime import Runtime


def frozen_networks(method: Method) -> list[nn.Module]:
    """The method's networks that cannot change: frozen (kept in eval mode) and without a trainable parameter."""
    return [module for module in method.frozen() if not any(p.requires_grad for p in module.parameters())]


def fold_batchnorms(network: nn.Module, example: Tensor) -> int:
    """Fold into its convolution every BatchNorm2d that normalises a Conv2d's output used by nothing else, in
    place (the network must be in eval mode); returns how many were folded. The pairs are read from the
    network's traced graph (torch.fx): a convolution whose output also feeds a residual connection, as a
    pre-activation block's input does, is left alone. The folded network's output on ``example`` is checked
    against the original's."""
    with torch.no_grad():
        expected = network(example)
    modules = dict(network.named_modules())
    nodes = list(torch.fx.symbolic_trace(network).graph.nodes)
    called = Counter(node.target for node in nodes if node.op == "call_module")
    folded = {}
    for node in nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if (isinstance(modules.get(node.target), nn.BatchNorm2d) and isinstance(source, torch.fx.Node)
                and source.op == "call_module" and isinstance(modules[source.target], nn.Conv2d)
                and len(source.users) == 1 and called[node.target] == called[source.target] == 1):
            folded[node.target] = source.target
    for bn_name, conv_name in folded.items():
        _replace(network, conv_name, fuse_conv_bn_eval(modules[conv_name], modules[bn_name]))
        _replace(network, bn_name, nn.Identity())
    with torch.no_grad():
        torch.testing.assert_close(network(example), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    return len(folded)


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def prepare_frozen(method: Method, runtime: Runtime, batches: Batches) -> list[nn.Module]:
    """On an accelerator, fold and cast the method's frozen networks once (see the module docstring; the
    first images of ``batches`` find and check the folds); returns them."""
    frozen = frozen_networks(method)
    if runtime.device.type == "cpu" or not frozen:
        return frozen
    example = next(iter(batches.epoch(0)))[0][:2].float()
    for network in frozen:
        fold_batchnorms(network, example)
        if runtime.amp_dtype is not None:
            network.to(dtype=runtime.amp_dtype)
    return frozen


def digest(networks: list[nn.Module]) -> str:
    """sha256 of the networks' parameters and buffers, in order: what a checkpoint records of the frozen
    networks it leaves out, so that a resumed run can tell it reloaded the same ones."""
    hasher = hashlib.sha256()
    for network in networks:
        for name, tensor in network.state_dict().items():
            hasher.update(name.encode())
            hasher.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()
