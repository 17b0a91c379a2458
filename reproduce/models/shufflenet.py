"""CRD's CIFAR ShuffleNets: ShuffleV1 (Zhang et al., 2018, 3 groups), ShuffleV2 (Ma et al., 2018).

Both drop the ImageNet stem's stride and max-pool, so a 32x32 input is downsampled 8x by the three
stages, and both keep CRD's 1x1 stem convolution.

Sources: HobbitLong/RepDistiller models/ShuffleNetv1.py and models/ShuffleNetv2.py (the same
networks as megvii-research/mdistiller models/cifar/). Their ShuffleV1 unit applies a ReLU after the
depthwise convolution + BN (unlike the paper's linear depthwise conv); their ShuffleV2 units do not.
Neither file initialises weights itself, so PyTorch's default init is kept (the Kaiming-uniform
layer defaults, identity BN). Counts at 100 classes: ShuffleV1 949,258, ShuffleV2 1,355,528.
"""

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from reproduce.models.base import SplitNet, classifier_head, conv_bn
from reproduce.models.registry import register


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleaves the channels of `groups` groups so the next grouped conv mixes all of them."""
    batch, channels, height, width = x.shape
    x = x.view(batch, groups, channels // groups, height, width).transpose(1, 2)
    return x.reshape(batch, channels, height, width)


class ShuffleV1Unit(nn.Module):
    """Grouped 1x1, shuffle, depthwise 3x3 (with ReLU, as CRD has it), grouped 1x1.

    A strided unit concatenates an average-pooled shortcut instead of adding it, so its branch only
    produces out_channels - in_channels channels.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, groups: int, first_conv_groups: int
    ) -> None:
        super().__init__()
        branch_channels = out_channels - in_channels if stride == 2 else out_channels
        bottleneck = branch_channels // 4
        self.shuffle_groups = first_conv_groups
        self.compress = nn.Sequential(
            conv_bn(in_channels, bottleneck, 1, groups=first_conv_groups), nn.ReLU(inplace=True)
        )
        self.expand = nn.Sequential(
            *conv_bn(bottleneck, bottleneck, 3, stride, groups=bottleneck),
            nn.ReLU(inplace=True),
            *conv_bn(bottleneck, branch_channels, 1, groups=groups),
        )
        self.pooled_shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.expand(channel_shuffle(self.compress(x), self.shuffle_groups))
        if self.pooled_shortcut is None:
            return F.relu(out + x)
        return F.relu(torch.cat([out, self.pooled_shortcut(x)], dim=1))


def shuffle_v1(num_classes: int, in_channels: int) -> SplitNet:
    groups = 3
    stem_channels = 24
    stages: list[nn.Module] = []
    channels = stem_channels
    for out_channels, num_units in ((240, 4), (480, 8), (960, 4)):
        units = []
        for index in range(num_units):
            units.append(
                ShuffleV1Unit(
                    channels,
                    out_channels,
                    stride=2 if index == 0 else 1,
                    groups=groups,
                    # The first unit reads the 24-channel stem, too narrow to split into groups.
                    first_conv_groups=1 if channels == stem_channels else groups,
                )
            )
            channels = out_channels
        stages.append(nn.Sequential(*units))
    stem = conv_bn(in_channels, stem_channels, 1)
    trunk = nn.Sequential(stem, nn.ReLU(inplace=True), *stages[:-1])
    head = classifier_head(stages[-1], features=channels, num_classes=num_classes)
    return SplitNet(trunk, head)


class ShuffleV2Unit(nn.Module):
    """Half the channels pass through untouched, the other half through 1x1, depthwise 3x3, 1x1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            conv_bn(half, half, 1),
            nn.ReLU(inplace=True),
            conv_bn(half, half, 3, groups=half),
            conv_bn(half, half, 1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        kept, transformed = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([kept, self.branch(transformed)], dim=1), 2)


class ShuffleV2DownUnit(nn.Module):
    """Both branches take the whole input and halve its resolution; outputs are concatenated."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        half = out_channels // 2
        self.left = nn.Sequential(
            conv_bn(in_channels, in_channels, 3, stride=2, groups=in_channels),
            conv_bn(in_channels, half, 1),
            nn.ReLU(inplace=True),
        )
        self.right = nn.Sequential(
            conv_bn(in_channels, half, 1),
            nn.ReLU(inplace=True),
            conv_bn(half, half, 3, stride=2, groups=half),
            conv_bn(half, half, 1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], dim=1), 2)


def shuffle_v2(num_classes: int, in_channels: int) -> SplitNet:
    stem_channels, last_channels = 24, 1024
    stages: list[nn.Module] = []
    channels = stem_channels
    # As in CRD, each stage is a down unit followed by `num_units` more units (4/8/4 in total).
    for out_channels, num_units in ((116, 3), (232, 7), (464, 3)):
        units = [ShuffleV2DownUnit(channels, out_channels)]
        units += [ShuffleV2Unit(out_channels) for _ in range(num_units)]
        stages.append(nn.Sequential(*units))
        channels = out_channels
    stem = conv_bn(in_channels, stem_channels, 1)
    trunk = nn.Sequential(stem, nn.ReLU(inplace=True), *stages[:-1])
    head = classifier_head(
        stages[-1],
        conv_bn(channels, last_channels, 1),
        nn.ReLU(inplace=True),
        features=last_channels,
        num_classes=num_classes,
    )
    return SplitNet(trunk, head)


register("ShuffleV1")(shuffle_v1)
register("ShuffleV2")(shuffle_v2)
