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

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from reproduce.data.loader import Batches
from reproduce.methods.base import Method
from reproduce.runtime import Runtime


def frozen_networks(method: Method) -> list[nn.Module]:
    """The method's networks that cannot change: frozen (kept in eval mode) and without a trainable parameter."""
    return [module for module in method.frozen() if not any(p.requires_grad for p in module.parameters())]


def fold_batchnorms(network: nn.Module, example: Tensor) -> int:
    """Fold every BatchNorm2d whose input is the output of a Conv2d into that convolution, in place (the
    network must be in eval mode); returns how many were folded. Which BatchNorm follows which convolution is
    read from one forward of ``example``; the folded network's output on it is checked against the original."""
    producers: dict[int, tuple[str, Tensor]] = {}  # the outputs are kept alive: an id is never reused
    pairs: dict[str, str] = {}
    calls: dict[str, int] = {}
    hooks = []
    for name, module in network.named_modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(
                lambda _m, _i, out, name=name: (producers.__setitem__(id(out), (name, out)),
                                                calls.__setitem__(name, calls.get(name, 0) + 1))))
        elif isinstance(module, nn.BatchNorm2d):
            hooks.append(module.register_forward_pre_hook(
                lambda _m, args, name=name: (calls.__setitem__(name, calls.get(name, 0) + 1),
                                             id(args[0]) in producers and pairs.__setitem__(name, producers[id(args[0])][0]))))
    with torch.no_grad():
        expected = network(example)
    for hook in hooks:
        hook.remove()
    # Only a convolution and a BatchNorm each called once, the one straight after the other.
    folded = {bn: conv for bn, conv in pairs.items() if calls[bn] == 1 and calls[conv] == 1}
    for bn_name, conv_name in folded.items():
        conv, bn = network.get_submodule(conv_name), network.get_submodule(bn_name)
        _replace(network, conv_name, fuse_conv_bn_eval(conv, bn))
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
