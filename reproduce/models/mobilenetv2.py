"""MobileNetV2 (Sandler et al., 2018) with a width multiplier, in two official variants.

CRD's CIFAR MobileNetV2 (`mobile_half`): MobileNetV2 and mobilenetv2_0.5. Source: HobbitLong/
RepDistiller models/mobilenetv2.py, identical to megvii-research/mdistiller models/cifar/
mobilenetv2.py and to the file SwitOKD ships for its CIFAR-100 student (hfutqian/SwitOKD
SwitOKD_code/CIFAR-100/WRN16-2_0.5mobilenetv2/models/mobilenetv2.py). It differs from the paper:
- a stride-2 stem and a stride-1 second stage (the paper strides the second stage instead), so a
  32x32 input is downsampled 16x overall and ends at 2x2;
- ReLU, not ReLU6, after every convolution but the linear projections;
- channels are `int(c * width)` (rounded down, not to multiples of 8), the last 1x1 convolution
  keeps 1280 channels for widths up to 1 and `int(1280 * width)` above;
- every inverted residual block has its 1x1 expansion convolution, also the t = 1 block, where it
  maps the channels onto themselves;
- no dropout (the file has it commented out); init: He (fan-out) convolutions, identity BN, a
  N(0, 0.01) classifier with zero bias.
At width 0.5 and 100 classes this is 812,836 parameters.

torchvision's MobileNetV2: mobilenetv2 (1.0) and mobilenetv2_1.4 (the layout SwitOKD's Tiny-ImageNet
student copies from torchvision). Channels rounded to multiples of 8, ReLU6, no expansion conv in
the t = 1 block, a N(0, 0.01) classifier with zero bias as torchvision initialises it. Two
departures from torchvision: the stem has stride 1 (instead of 2) for small images, so a 32x32
input ends at 2x2, and there is no dropout before the classifier (the SplitNet head ends with
pooling, flatten, linear).
"""

from torch import Tensor, nn

from reproduce.models.base import SplitNet, classifier_head, conv_bn, init_cifar_weights
from reproduce.models.registry import register

# (expansion factor, output channels, blocks, stride of the first block) for each stage.
TORCHVISION_STAGES = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
# CRD moves the downsampling of the second stage into the stem.
CRD_STAGES = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
STEM_CHANNELS = 32
LAST_CHANNELS = 1280

Activation = type[nn.ReLU] | type[nn.ReLU6]


def round_channels(channels: float, divisor: int = 8) -> int:
    """Nearest multiple of `divisor`, never more than 10% below `channels` (paper's rounding)."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * channels:
        rounded += divisor
    return rounded


def conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    activation: Activation,
    stride: int = 1,
    groups: int = 1,
) -> nn.Sequential:
    return nn.Sequential(
        *conv_bn(in_channels, out_channels, kernel_size, stride, groups), activation(inplace=True)
    )


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, linear 1x1 projection; residual when shapes match.

    `always_expand` keeps the expansion conv at expansion 1 (CRD), where torchvision drops it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        expansion: int,
        activation: Activation,
        always_expand: bool,
    ) -> None:
        super().__init__()
        hidden = in_channels * expansion
        expand = (
            [conv_bn_act(in_channels, hidden, 1, activation)]
            if expansion != 1 or always_expand
            else []
        )
        self.layers = nn.Sequential(
            *expand,
            conv_bn_act(hidden, hidden, 3, activation, stride, groups=hidden),
            *conv_bn(hidden, out_channels, 1),
        )
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(x)
        return x + out if self.use_residual else out


def build_mobilenet_v2(
    stem: nn.Module,
    channels: int,
    stage_widths: list[tuple[int, int, int, int]],
    last_channels: int,
    activation: Activation,
    always_expand: bool,
    num_classes: int,
) -> SplitNet:
    """The stem, seven stages (the last one in the head), the 1x1 conv to `last_channels`."""
    stages: list[nn.Module] = [stem]
    for expansion, out_channels, num_blocks, stride in stage_widths:
        blocks = []
        for index in range(num_blocks):
            block_stride = stride if index == 0 else 1
            blocks.append(
                InvertedResidual(
                    channels, out_channels, block_stride, expansion, activation, always_expand
                )
            )
            channels = out_channels
        stages.append(nn.Sequential(*blocks))
    head = classifier_head(
        stages[-1],
        conv_bn_act(channels, last_channels, 1, activation),
        features=last_channels,
        num_classes=num_classes,
    )
    model = SplitNet(nn.Sequential(*stages[:-1]), head)
    init_cifar_weights(model, linear_std=0.01)
    return model


def crd_mobilenet_v2(width: float, num_classes: int, in_channels: int) -> SplitNet:
    stem_channels = int(STEM_CHANNELS * width)
    return build_mobilenet_v2(
        stem=conv_bn_act(in_channels, stem_channels, 3, nn.ReLU, stride=2),
        channels=stem_channels,
        stage_widths=[(t, int(c * width), n, s) for t, c, n, s in CRD_STAGES],
        last_channels=int(LAST_CHANNELS * width) if width > 1.0 else LAST_CHANNELS,
        activation=nn.ReLU,
        always_expand=True,
        num_classes=num_classes,
    )


def mobilenet_v2(width: float, num_classes: int, in_channels: int) -> SplitNet:
    stem_channels = round_channels(STEM_CHANNELS * width)
    return build_mobilenet_v2(
        stem=conv_bn_act(in_channels, stem_channels, 3, nn.ReLU6, stride=1),
        channels=stem_channels,
        stage_widths=[(t, round_channels(c * width), n, s) for t, c, n, s in TORCHVISION_STAGES],
        last_channels=round_channels(LAST_CHANNELS * max(1.0, width)),
        activation=nn.ReLU6,
        always_expand=False,
        num_classes=num_classes,
    )


def register_mobilenet_v2(name: str, width: float, crd: bool) -> None:
    builder = crd_mobilenet_v2 if crd else mobilenet_v2

    def build(num_classes: int, in_channels: int) -> SplitNet:
        return builder(width, num_classes, in_channels)

    register(name)(build)


register_mobilenet_v2("mobilenetv2", 1.0, crd=False)
register_mobilenet_v2("mobilenetv2_1.4", 1.4, crd=False)
# CRD's tables call its mobile_half "MobileNetV2"; SwitOKD's CIFAR-100 "0.5xMobileNetV2" is the same
# network.
register_mobilenet_v2("MobileNetV2", 0.5, crd=True)
register_mobilenet_v2("mobilenetv2_0.5", 0.5, crd=True)
