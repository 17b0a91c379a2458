"""CIFAR ResNets as used by CRD / RepDistiller.

resnet8 ... resnet110 follow He et al. (2016, sec. 4.2): a 16-channel stem and three stages of
BasicBlocks of widths 16/32/64, depth = 6n + 2. resnet8x4 / resnet32x4 are CRD's 4x wider variants
(32-channel stem, stages 64/128/256). Unlike the paper's parameter-free option-A shortcut, CRD
downsamples shortcuts with a 1x1 convolution + BN, and so do we, to match the CRD parameter counts.

ResNet50 is CRD's CIFAR ResNet-50: ImageNet bottleneck layout [3, 4, 6, 3] with a 3x3 stride-1 stem
and no max-pool, so 32x32 inputs are only downsampled 8x. ResNet18 is the same file's BasicBlock
[2, 2, 2, 2] network: mdistiller's Tiny-ImageNet teacher (download_ckpts/tiny_imagenet_teachers/
ResNet18_vanilla/ti_res18).

Sources: HobbitLong/RepDistiller models/resnet.py (resnet8 ... resnet32x4) and models/resnetv2.py
(ResNet50), the same files as megvii-research/mdistiller models/cifar/. Both initialise the
convolutions with He (fan-out) and BN as identity, and leave the classifier at PyTorch's default
init, its bias included.
"""

from torch import Tensor, nn
from torch.nn import functional as F

from reproduce.models.base import SplitNet, classifier_head, init_cifar_weights
from reproduce.models.registry import register


def conv_bn(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False
        ),
        nn.BatchNorm2d(out_channels),
    )


def shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity where shapes match, else the 1x1 convolution + BN projection."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return conv_bn(in_channels, out_channels, kernel_size=1, stride=stride)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            conv_bn(in_channels, channels, 3, stride),
            nn.ReLU(inplace=True),
            conv_bn(channels, channels, 3),
        )
        self.shortcut = shortcut(in_channels, channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.residual(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.residual = nn.Sequential(
            conv_bn(in_channels, channels, 1),
            nn.ReLU(inplace=True),
            conv_bn(channels, channels, 3, stride),
            nn.ReLU(inplace=True),
            conv_bn(channels, out_channels, 1),
        )
        self.shortcut = shortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.residual(x) + self.shortcut(x))


Block = type[BasicBlock] | type[Bottleneck]


def make_stage(
    block: Block, in_channels: int, channels: int, num_blocks: int, stride: int
) -> nn.Sequential:
    """`num_blocks` blocks; only the first one changes resolution and width."""
    blocks = [block(in_channels, channels, stride)]
    blocks += [block(channels * block.expansion, channels) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def resnet(
    block: Block,
    stem_width: int,
    stage_widths: list[int],
    blocks_per_stage: list[int],
    stage_strides: list[int],
    num_classes: int,
    in_channels: int,
) -> SplitNet:
    stages: list[nn.Sequential] = []
    width = stem_width
    for channels, num_blocks, stride in zip(
        stage_widths, blocks_per_stage, stage_strides, strict=True
    ):
        stages.append(make_stage(block, width, channels, num_blocks, stride))
        width = channels * block.expansion
    trunk = nn.Sequential(conv_bn(in_channels, stem_width, 3), nn.ReLU(inplace=True), *stages[:-1])
    head = classifier_head(stages[-1], features=width, num_classes=num_classes)
    model = SplitNet(trunk, head)
    init_cifar_weights(model, zero_linear_bias=False)
    return model


def register_cifar_resnet(name: str, depth: int, stem_width: int, stage_widths: list[int]) -> None:
    """Registers the three-stage BasicBlock ResNet of depth 6n + 2."""
    blocks_per_stage = (depth - 2) // 6
    if 6 * blocks_per_stage + 2 != depth:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")

    def build(num_classes: int, in_channels: int) -> SplitNet:
        return resnet(
            BasicBlock,
            stem_width,
            stage_widths,
            blocks_per_stage=[blocks_per_stage] * 3,
            stage_strides=[1, 2, 2],
            num_classes=num_classes,
            in_channels=in_channels,
        )

    register(name)(build)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    register_cifar_resnet(f"resnet{_depth}", _depth, stem_width=16, stage_widths=[16, 32, 64])
# CRD's x4 variants widen the stages 4x but the stem only 2x.
for _depth in (8, 32):
    register_cifar_resnet(f"resnet{_depth}x4", _depth, stem_width=32, stage_widths=[64, 128, 256])


def register_resnetv2(name: str, block: Block, blocks_per_stage: list[int]) -> None:
    """Registers a four-stage network of CRD's resnetv2.py (64-channel 3x3 stride-1 stem, no max-pool)."""

    def build(num_classes: int, in_channels: int) -> SplitNet:
        return resnet(
            block,
            stem_width=64,
            stage_widths=[64, 128, 256, 512],
            blocks_per_stage=blocks_per_stage,
            stage_strides=[1, 2, 2, 2],
            num_classes=num_classes,
            in_channels=in_channels,
        )

    register(name)(build)


register_resnetv2("ResNet18", BasicBlock, [2, 2, 2, 2])
register_resnetv2("ResNet50", Bottleneck, [3, 4, 6, 3])
