"""MobileNetV2 (Sandler et al., 2018) for small images, with a width multiplier.

Channel counts are rounded to multiples of 8 as in the paper / torchvision, and the last 1x1
convolution keeps 1280 channels for multipliers below 1. For CIFAR-sized inputs the stem has
stride 1 (instead of 2), so the network downsamples 16x overall and a 32x32 input ends at 2x2.

Registered: mobilenetv2 (1.0), mobilenetv2_0.5, mobilenetv2_1.4, and MobileNetV2, the name CRD's
tables use for its half-width model ("mobile_half"). That alias is our width-0.5 network: CRD's code
rounds channels down instead of to multiples of 8 and keeps a redundant expansion conv in the first
block, which changes the 100-class count only from 0.813 M to 0.816 M.
"""

from torch import Tensor, nn

from reproduce.models.base import SplitNet, classifier_head, conv_bn, init_cifar_weights
from reproduce.models.registry import register

# (expansion factor, output channels, blocks, stride of the first block) for each stage.
STAGES = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


def round_channels(channels: float, divisor: int = 8) -> int:
    """Nearest multiple of `divisor`, never more than 10% below `channels` (paper's rounding)."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * channels:
        rounded += divisor
    return rounded


def conv_bn_relu6(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(*conv_bn(in_channels, out_channels, kernel_size, stride, groups), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, linear 1x1 projection; residual when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        expand = [conv_bn_relu6(in_channels, hidden, 1)] if expansion != 1 else []
        self.layers = nn.Sequential(
            *expand,
            conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(x)
        return x + out if self.use_residual else out


def mobilenet_v2(width: float, num_classes: int, in_channels: int) -> SplitNet:
    channels = round_channels(STEM_CHANNELS * width)
    stages: list[nn.Module] = [conv_bn_relu6(in_channels, channels, 3, stride=1)]
    for expansion, stage_channels, num_blocks, stride in STAGES:
        out_channels = round_channels(stage_channels * width)
        blocks = []
        for index in range(num_blocks):
            block_stride = stride if index == 0 else 1
            blocks.append(InvertedResidual(channels, out_channels, block_stride, expansion))
            channels = out_channels
        stages.append(nn.Sequential(*blocks))
    last_channels = round_channels(LAST_CHANNELS * max(1.0, width))
    head = classifier_head(
        stages[-1],
        conv_bn_relu6(channels, last_channels, 1),
        features=last_channels,
        num_classes=num_classes,
    )
    model = SplitNet(nn.Sequential(*stages[:-1]), head)
    init_cifar_weights(model)
    return model


def register_mobilenet_v2(name: str, width: float) -> None:
    def build(num_classes: int, in_channels: int) -> SplitNet:
        return mobilenet_v2(width, num_classes, in_channels)

    register(name)(build)


register_mobilenet_v2("mobilenetv2", 1.0)
register_mobilenet_v2("mobilenetv2_0.5", 0.5)
register_mobilenet_v2("mobilenetv2_1.4", 1.4)
register_mobilenet_v2("MobileNetV2", 0.5)
