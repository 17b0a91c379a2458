"""MobileNetV1 (Howard et al., 2017) as mdistiller's ImageNet student: DKD's ResNet-50 -> MobileNetV1 row.

Source: megvii-research/mdistiller mdistiller/models/imagenet/mobilenetv1.py. A stride-2 3x3 stem
(32 channels) and 13 depthwise-separable blocks (3x3 depthwise conv-BN-ReLU, 1x1 conv-BN-ReLU), every
convolution without bias, global average pooling and a 1024 -> classes linear layer; 4,231,976
parameters at 1000 classes. The file leaves every layer at PyTorch's default init, and so do we. Its
7x7 average pool becomes the zoo's adaptive pool (the same on 224x224 inputs). The last stage (the two
1024-channel blocks) forms the head.
"""

from torch import nn

from reproduce.models.base import SplitNet, classifier_head
from reproduce.models.registry import register

STEM_CHANNELS = 32
# (output channels, stride) of each depthwise-separable block.
BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
          (512, 1), (1024, 2), (1024, 1)]
HEAD_BLOCKS = 2


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, groups=groups,
                      bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def depthwise_separable(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(*conv_bn_relu(in_channels, in_channels, 3, stride, groups=in_channels),
                         *conv_bn_relu(in_channels, out_channels, 1, 1))


@register("MobileNetV1")
def mobilenet_v1(num_classes: int, in_channels: int) -> SplitNet:
    layers: list[nn.Module] = [nn.Sequential(*conv_bn_relu(in_channels, STEM_CHANNELS, 3, 2))]
    channels = STEM_CHANNELS
    for out_channels, stride in BLOCKS:
        layers.append(depthwise_separable(channels, out_channels, stride))
        channels = out_channels
    head = classifier_head(*layers[-HEAD_BLOCKS:], features=channels, num_classes=num_classes)
    return SplitNet(nn.Sequential(*layers[:-HEAD_BLOCKS]), head)
