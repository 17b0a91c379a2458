"""torchvision's ImageNet ResNets (resnet18/34/50), split after layer3.

Weights are freshly initialised (weights=None): the suite trains its own teachers. torchvision is
imported when one of these is built: importing it pulls in torch._dynamo (~2 s), a cost every
training process of the CIFAR-scale pipeline would otherwise pay.
"""

import importlib

from torch import nn

from reproduce.models.base import SplitNet
from reproduce.models.registry import register


def split_torchvision_resnet(builder_name: str, num_classes: int, in_channels: int) -> SplitNet:
    builder = getattr(importlib.import_module("torchvision.models"), builder_name)
    net = builder(weights=None, num_classes=num_classes)
    if in_channels != 3:
        stem = net.conv1
        net.conv1 = nn.Conv2d(
            in_channels,
            stem.out_channels,
            stem.kernel_size,
            stem.stride,
            stem.padding,
            bias=False,
        )
        # Same init torchvision gives its own stem.
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    trunk = nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3
    )
    head = nn.Sequential(net.layer4, net.avgpool, nn.Flatten(), net.fc)
    return SplitNet(trunk, head)


def register_torchvision_resnet(name: str) -> None:
    def build(num_classes: int, in_channels: int) -> SplitNet:
        return split_torchvision_resnet(name, num_classes, in_channels)

    register(name)(build)


for _name in ("resnet18", "resnet34", "resnet50"):
    register_torchvision_resnet(_name)
