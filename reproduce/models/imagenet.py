"""torchvision's ImageNet ResNets (resnet18/34/50), split after layer3.

Weights are freshly initialised (weights=None): the suite trains its own teachers.
"""

from collections.abc import Callable

import torchvision
from torch import nn

from reproduce.models.base import SplitNet
from reproduce.models.registry import register

TorchvisionResNetBuilder = Callable[..., torchvision.models.ResNet]


def split_torchvision_resnet(
    builder: TorchvisionResNetBuilder, num_classes: int, in_channels: int
) -> SplitNet:
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


def register_torchvision_resnet(name: str, builder: TorchvisionResNetBuilder) -> None:
    def build(num_classes: int, in_channels: int) -> SplitNet:
        return split_torchvision_resnet(builder, num_classes, in_channels)

    register(name)(build)


register_torchvision_resnet("resnet18", torchvision.models.resnet18)
register_torchvision_resnet("resnet34", torchvision.models.resnet34)
register_torchvision_resnet("resnet50", torchvision.models.resnet50)
