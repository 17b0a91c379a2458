"""SwitOKD's own Wide ResNets: switokd_wrn_<depth>_<widen>.

Source: hfutqian/SwitOKD, SwitOKD_code/CIFAR-10/WRN-16-1_8/models/wrnet16_1.py and wrnet16_8.py
(the CIFAR-10 pair) and the CIFAR-100 WRN-16-2 teacher's models/wrnet.py (shipped there only as
bytecode; the same class is in SwitOKD_code/multi-net setting (table 7)/.../models/wrnet.py). These
are not CRD's WRNs (wrn.py), which the CRD pairs keep. Differences from CRD's:
- the stride of a block sits on its second 3x3 convolution, not the first;
- a projection shortcut (a 1x1 convolution, no BN) reads the block's raw input, not the
  pre-activated one;
- every convolution has a bias;
- the final BN has momentum 0.9 (the Torch7 convention carried over: PyTorch then keeps only 10% of
  the old running statistics at each step);
- init: xavier_uniform with gain sqrt(2) for every convolution, zero conv biases, identity BN, and
  PyTorch's default for the classifier (conv_init touches only Conv and BatchNorm classes).
The blocks hold an unused dropout (rate 0.3, commented out of forward), left out here.
Counts: switokd_wrn_16_2 704,420 at 100 classes; switokd_wrn_16_8 10,965,866 and switokd_wrn_16_1
175,626 at 10 classes.
"""

import math

from torch import Tensor, nn

from reproduce.models.base import SplitNet
from reproduce.models.registry import register
from reproduce.models.wrn import bn_relu, wide_resnet

FINAL_BN_MOMENTUM = 0.9


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=True)


class SwitOKDWideBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3 (strided), plus the raw input or its 1x1 projection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            bn_relu(in_channels),
            conv3x3(in_channels, out_channels),
            bn_relu(out_channels),
            conv3x3(out_channels, out_channels, stride),
        )
        self.shortcut = (
            nn.Identity()
            if in_channels == out_channels and stride == 1
            else nn.Conv2d(in_channels, out_channels, 1, stride, bias=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.residual(x) + self.shortcut(x)


def init_switokd_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.xavier_uniform_(module.weight, gain=math.sqrt(2.0))
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def switokd_wide_resnet(depth: int, widen: int, num_classes: int, in_channels: int) -> SplitNet:
    """SwitOKD's WRN-depth-widen: a biased 3x3 stem, three stages of 16k/32k/64k channels."""
    return wide_resnet(depth, widen, num_classes, in_channels, block=SwitOKDWideBlock, stem=conv3x3,
                       final_bn_momentum=FINAL_BN_MOMENTUM, init=init_switokd_weights)


def register_switokd_wrn(depth: int, widen: int) -> None:
    def build(num_classes: int, in_channels: int) -> SplitNet:
        return switokd_wide_resnet(depth, widen, num_classes, in_channels)

    register(f"switokd_wrn_{depth}_{widen}")(build)


for _depth, _widen in ((16, 1), (16, 2), (16, 8)):
    register_switokd_wrn(_depth, _widen)
