"""How the official model files name the tensors of each zoo architecture: the upstream key layouts.

The zoo's modules are named by their role in a SplitNet (``trunk.2.0.residual.0.0.weight``); the
checkpoints the papers distil from carry the official files' names (``layer1.0.conv1.weight``). For
every architecture with an upstream layout this file says which of our modules is which of theirs, as
(our module path, their module path) pairs read off the official definitions:

- "crd": HobbitLong/RepDistiller models/ (= megvii-research/mdistiller mdistiller/models/cifar/): resnet.py
  (resnet8 ... resnet110, resnet8x4, resnet32x4), resnetv2.py (ResNet18, ResNet50), wrn.py, vgg.py
  (the ``vgg*_bn`` builders), mobilenetv2.py (``mobile_half``), ShuffleNetv1.py, ShuffleNetv2.py; and
  mdistiller's ImageNet mobilenetv1.py (MobileNetV1).
- "torchvision": torchvision/models/resnet.py (resnet18/34/50), whose modules the zoo reuses as they are.

A pair maps a whole subtree: every tensor below our path is the tensor with the same remaining name
below theirs (leaf names such as ``weight`` and ``running_mean`` are PyTorch's in both). ``key_map``
expands the pairs over a model's state_dict and refuses to leave any of our tensors unmapped.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from reproduce.models.base import SplitNet

Pairs = list[tuple[str, str]]
LAYOUTS = ("crd", "torchvision")


def key_map(model: SplitNet, arch: str) -> dict[str, str]:
    """Our state_dict key -> the upstream key, for ``arch``'s upstream layout (``upstream_layout(arch)``)."""
    pairs = dict(ARCHITECTURES[arch][1](model))
    ours_to_theirs: dict[str, str] = {}
    for key in model.state_dict():
        owner = max((ours for ours in pairs if key.startswith(ours + ".")), key=len, default=None)
        if owner is None:
            raise AssertionError(f"{arch}: the upstream layout leaves {key} unmapped")
        ours_to_theirs[key] = pairs[owner] + key[len(owner):]
    return ours_to_theirs


def upstream_layout(arch: str) -> str | None:
    """The layout of ``arch``'s official file ("crd" | "torchvision"), None where the zoo knows none."""
    return ARCHITECTURES[arch][0] if arch in ARCHITECTURES else None


# ----------------------------------------------------------------------------------------------
# CRD's CIFAR ResNets: resnet.py names the shortcut `downsample` and the classifier `fc`; resnetv2.py
# names them `shortcut` and `linear`. Both: conv1/bn1 stem, layer<k>.<i>.conv<j>/bn<j> blocks.


def _stages(model: SplitNet, first: int) -> list[tuple[str, nn.Module]]:
    """The stages of a net whose trunk holds ``first`` stem modules and whose head starts with the last stage."""
    return [(f"trunk.{index}", model.trunk[index]) for index in range(first, len(model.trunk))] + \
        [("head.0", model.head[0])]


def _residual_blocks(stages: list[tuple[str, nn.Module]], shortcut: str) -> Pairs:
    pairs: Pairs = []
    for stage_index, (stage_path, stage) in enumerate(stages, start=1):
        for block_index, block in enumerate(stage):
            ours, theirs = f"{stage_path}.{block_index}", f"layer{stage_index}.{block_index}"
            # residual = conv_bn, ReLU, conv_bn[, ReLU, conv_bn]: the convs sit at even positions.
            for conv, position in enumerate(range(0, len(block.residual), 2), start=1):
                pairs += [(f"{ours}.residual.{position}.0", f"{theirs}.conv{conv}"),
                          (f"{ours}.residual.{position}.1", f"{theirs}.bn{conv}")]
            if not isinstance(block.shortcut, nn.Identity):
                pairs.append((f"{ours}.shortcut", f"{theirs}.{shortcut}"))
    return pairs


def crd_resnet(model: SplitNet) -> Pairs:
    return [("trunk.0.0", "conv1"), ("trunk.0.1", "bn1"), ("head.3", "fc"),
            *_residual_blocks(_stages(model, first=2), shortcut="downsample")]


def crd_resnetv2(model: SplitNet) -> Pairs:
    return [("trunk.0.0", "conv1"), ("trunk.0.1", "bn1"), ("head.3", "linear"),
            *_residual_blocks(_stages(model, first=2), shortcut="shortcut")]


def crd_wrn(model: SplitNet) -> Pairs:
    """wrn.py: conv1, block<k>.layer.<i>.{bn1, conv1, bn2, conv2, convShortcut}, the final bn1, fc."""
    pairs: Pairs = [("trunk.0", "conv1"), ("head.1", "bn1"), ("head.5", "fc")]
    for stage_index, (stage_path, stage) in enumerate(_stages(model, first=1), start=1):
        for block_index, block in enumerate(stage):
            ours, theirs = f"{stage_path}.{block_index}", f"block{stage_index}.layer.{block_index}"
            pairs += [(f"{ours}.pre_activation.0", f"{theirs}.bn1"), (f"{ours}.residual.0", f"{theirs}.conv1"),
                      (f"{ours}.residual.1.0", f"{theirs}.bn2"), (f"{ours}.residual.2", f"{theirs}.conv2")]
            if block.projection is not None:
                pairs.append((f"{ours}.projection", f"{theirs}.convShortcut"))
    return pairs


def crd_vgg(model: SplitNet) -> Pairs:
    """vgg.py: block0..block4 hold conv, BN, ReLU triples at the zoo's positions; the linear is `classifier`."""
    blocks = [f"trunk.{index}" for index, module in enumerate(model.trunk) if isinstance(module, nn.Sequential)]
    return [*((ours, f"block{index}") for index, ours in enumerate([*blocks, "head.0"])), ("head.3", "classifier")]


def crd_mobilenetv2(model: SplitNet) -> Pairs:
    """mobilenetv2.py: conv1 (conv, BN, ReLU), blocks.<s>.<i>.conv (pw 0/1, dw 3/4, pw-linear 6/7), conv2, classifier.0."""
    pairs: Pairs = [("trunk.0", "conv1"), ("head.1", "conv2"), ("head.4", "classifier.0")]
    for stage_index, (stage_path, stage) in enumerate(_stages(model, first=1)):
        for block_index in range(len(stage)):
            ours, theirs = f"{stage_path}.{block_index}.layers", f"blocks.{stage_index}.{block_index}.conv"
            pairs += [(f"{ours}.0.0", f"{theirs}.0"), (f"{ours}.0.1", f"{theirs}.1"), (f"{ours}.1.0", f"{theirs}.3"),
                      (f"{ours}.1.1", f"{theirs}.4"), (f"{ours}.2", f"{theirs}.6"), (f"{ours}.3", f"{theirs}.7")]
    return pairs


def crd_shufflev1(model: SplitNet) -> Pairs:
    """ShuffleNetv1.py: conv1/bn1 stem, layer<k>.<i>.{conv1, bn1, conv2, bn2, conv3, bn3}, linear."""
    pairs: Pairs = [("trunk.0.0", "conv1"), ("trunk.0.1", "bn1"), ("head.3", "linear")]
    for stage_index, (stage_path, stage) in enumerate(_stages(model, first=2), start=1):
        for unit in range(len(stage)):
            ours, theirs = f"{stage_path}.{unit}", f"layer{stage_index}.{unit}"
            pairs += [(f"{ours}.compress.0.0", f"{theirs}.conv1"), (f"{ours}.compress.0.1", f"{theirs}.bn1"),
                      (f"{ours}.expand.0", f"{theirs}.conv2"), (f"{ours}.expand.1", f"{theirs}.bn2"),
                      (f"{ours}.expand.3", f"{theirs}.conv3"), (f"{ours}.expand.4", f"{theirs}.bn3")]
    return pairs


def crd_shufflev2(model: SplitNet) -> Pairs:
    """ShuffleNetv2.py: each stage's DownBlock (left conv1/bn1, conv2/bn2; right conv3..bn5), then BasicBlocks
    (conv1/bn1, conv2/bn2, conv3/bn3 on the transformed half); conv2/bn2 before the pooling; linear."""
    pairs: Pairs = [("trunk.0.0", "conv1"), ("trunk.0.1", "bn1"), ("head.1.0", "conv2"), ("head.1.1", "bn2"),
                    ("head.5", "linear")]
    down = [("left.0", 1), ("left.1", 2), ("right.0", 3), ("right.2", 4), ("right.3", 5)]
    unit = [("branch.0", 1), ("branch.2", 2), ("branch.3", 3)]
    for stage_index, (stage_path, stage) in enumerate(_stages(model, first=2), start=1):
        for index in range(len(stage)):
            ours, theirs = f"{stage_path}.{index}", f"layer{stage_index}.{index}"
            for path, number in (down if index == 0 else unit):
                pairs += [(f"{ours}.{path}.0", f"{theirs}.conv{number}"), (f"{ours}.{path}.1", f"{theirs}.bn{number}")]
    return pairs


def mdistiller_mobilenetv1(model: SplitNet) -> Pairs:
    """mobilenetv1.py: model.0 (stem), model.1 ... model.13 (blocks, the zoo's inner order), fc."""
    layers = [f"trunk.{index}" for index in range(len(model.trunk))] + ["head.0", "head.1"]
    return [*((ours, f"model.{index}") for index, ours in enumerate(layers)), ("head.4", "fc")]


def torchvision_resnet(model: SplitNet) -> Pairs:
    """The zoo wraps torchvision's own modules: trunk = conv1, bn1, relu, maxpool, layer1-3; head = layer4, ..., fc."""
    return [("trunk.0", "conv1"), ("trunk.1", "bn1"), ("trunk.4", "layer1"), ("trunk.5", "layer2"),
            ("trunk.6", "layer3"), ("head.0", "layer4"), ("head.3", "fc")]


ARCHITECTURES: dict[str, tuple[str, Callable[[SplitNet], Pairs]]] = {
    **{name: ("crd", crd_resnet) for name in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56",
                                             "resnet110", "resnet8x4", "resnet32x4")},
    "ResNet18": ("crd", crd_resnetv2),
    "ResNet50": ("crd", crd_resnetv2),
    **{name: ("crd", crd_wrn) for name in ("wrn_16_1", "wrn_16_2", "wrn_16_8", "wrn_40_1", "wrn_40_2")},
    **{name: ("crd", crd_vgg) for name in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")},
    "MobileNetV2": ("crd", crd_mobilenetv2),
    "mobilenetv2_0.5": ("crd", crd_mobilenetv2),
    "ShuffleV1": ("crd", crd_shufflev1),
    "ShuffleV2": ("crd", crd_shufflev2),
    "MobileNetV1": ("crd", mdistiller_mobilenetv1),
    **{name: ("torchvision", torchvision_resnet) for name in ("resnet18", "resnet34", "resnet50")},
}
