"""Wide ResNets (Zagoruyko & Komodakis, 2016) as used by CRD: wrn_<depth>_<widen>.

Pre-activation BasicBlocks in three stages of widths 16k/32k/64k after a 16-channel stem,
depth = 6n + 4, dropout 0. Because blocks are pre-activated, the network ends with its own
BN + ReLU, which belongs to the head.

Source: HobbitLong/RepDistiller models/wrn.py (= megvii-research/mdistiller models/cifar/wrn.py):
He (fan-out) convolutions without biases, identity BN, a classifier with PyTorch's default weight
and a zero bias. SwitOKD's own WRNs differ and live in switokd_wrn.py.
"""

from collections.abc import Callable

from torch import Tensor, nn

from reproduce.models.base import SplitNet, classifier_head, init_cifar_weights
from reproduce.models.registry import register


def bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.pre_activation = bn_relu(in_channels)
        self.residual = nn.Sequential(
            conv3x3(in_channels, out_channels, stride),
            bn_relu(out_channels),
            conv3x3(out_channels, out_channels),
        )
        # As in the reference WRN code, a projecting shortcut reads the pre-activated input,
        # an identity shortcut the raw one.
        self.projection = (
            None
            if in_channels == out_channels and stride == 1
            else nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        activated = self.pre_activation(x)
        shortcut = x if self.projection is None else self.projection(activated)
        return self.residual(activated) + shortcut


def make_stage(block: Callable[[int, int, int], nn.Module], in_channels: int, out_channels: int, num_blocks: int,
               stride: int) -> nn.Sequential:
    blocks = [block(in_channels, out_channels, stride)]
    blocks += [block(out_channels, out_channels, 1) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def wide_resnet(depth: int, widen: int, num_classes: int, in_channels: int, *,
                block: Callable[[int, int, int], nn.Module] = PreActBlock,
                stem: Callable[[int, int], nn.Module] = conv3x3, final_bn_momentum: float = 0.1,
                init: Callable[[nn.Module], None] = init_cifar_weights) -> SplitNet:
    """WRN-depth-widen: a 3x3 stem, three stages of 16k/32k/64k channels, BN-ReLU, the classifier.
    The defaults are CRD's; SwitOKD's own WRN (switokd_wrn.py) passes its block, stem, BN and init."""
    blocks_per_stage = (depth - 4) // 6
    if 6 * blocks_per_stage + 4 != depth:
        raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    trunk = nn.Sequential(
        stem(in_channels, widths[0]),
        make_stage(block, widths[0], widths[1], blocks_per_stage, stride=1),
        make_stage(block, widths[1], widths[2], blocks_per_stage, stride=2),
    )
    head = classifier_head(
        make_stage(block, widths[2], widths[3], blocks_per_stage, stride=2),
        nn.BatchNorm2d(widths[3], momentum=final_bn_momentum),
        nn.ReLU(inplace=True),
        features=widths[3],
        num_classes=num_classes,
    )
    model = SplitNet(trunk, head)
    init(model)
    return model


def register_wrn(depth: int, widen: int) -> None:
    def build(num_classes: int, in_channels: int) -> SplitNet:
        return wide_resnet(depth, widen, num_classes, in_channels)

    register(f"wrn_{depth}_{widen}")(build)


for _depth, _widen in ((16, 1), (16, 2), (16, 8), (40, 1), (40, 2)):
    register_wrn(_depth, _widen)
