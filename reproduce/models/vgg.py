"""CRD's CIFAR VGGs with BatchNorm: five blocks of 3x3 conv-BN-ReLU, one linear classifier.

Layout follows CRD: max-pools follow blocks 0-2 only, so a 32x32 input reaches blocks 3 and 4 at
4x4, and global average pooling replaces VGG's fully connected layers. The pools use ceil_mode so a
map of odd or unit size rounds up instead of shrinking to nothing: an 8x8 input reaches block 3 at
1x1. (CRD inserts a fourth pool for 64x64 inputs only; we keep one layout for every input size.)

Source: HobbitLong/RepDistiller models/vgg.py (= megvii-research/mdistiller models/cifar/vgg.py),
the `vgg*_bn` builders. As there, every convolution keeps its bias although the BN right after
makes it redundant (vgg13: 9,462,180 parameters at 100 classes, vgg8: 3,965,028), and the init is
He (fan-out) for the convolutions with zero biases, identity BN, and a N(0, 0.01) classifier with
zero bias.
"""

from torch import nn

from reproduce.models.base import SplitNet, classifier_head, init_cifar_weights
from reproduce.models.registry import register

# Output channels of each convolution, block by block.
BLOCK_WIDTHS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [
        [64, 64],
        [128, 128],
        [256, 256, 256, 256],
        [512, 512, 512, 512],
        [512, 512, 512, 512],
    ],
}
POOLED_BLOCKS = 3


def conv_block(in_channels: int, widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [
            nn.Conv2d(in_channels, width, 3, padding=1, bias=True),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        in_channels = width
    return nn.Sequential(*layers)


def vgg(block_widths: list[list[int]], num_classes: int, in_channels: int) -> SplitNet:
    trunk = nn.Sequential()
    for index, widths in enumerate(block_widths[:-1]):
        trunk.append(conv_block(in_channels, widths))
        if index < POOLED_BLOCKS:
            trunk.append(nn.MaxPool2d(2, ceil_mode=True))
        in_channels = widths[-1]
    last_block = conv_block(in_channels, block_widths[-1])
    head = classifier_head(last_block, features=block_widths[-1][-1], num_classes=num_classes)
    model = SplitNet(trunk, head)
    init_cifar_weights(model, linear_std=0.01)
    return model


def register_vgg(name: str) -> None:
    def build(num_classes: int, in_channels: int) -> SplitNet:
        return vgg(BLOCK_WIDTHS[name], num_classes, in_channels)

    register(name)(build)


for _name in BLOCK_WIDTHS:
    register_vgg(_name)
