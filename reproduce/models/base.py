"""The contract every model of the zoo follows, plus the weight init the CIFAR models share."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from reproduce.models.pretrained import PretrainedSource


class SplitNet(nn.Module):
    """A classifier split into a trunk and a head: forward(x) == head(trunk(x)).

    The head holds the network's last stage, final norm/activation, global pooling, flatten and the
    classifier (an nn.Linear as its last module). SOKD grafts a trainable copy of a teacher's head
    onto the frozen trunk (copy.deepcopy(model.head)); AEKT reads penultimate features.
    """

    source: PretrainedSource | None = None  # where its weights came from (load_pretrained); None: freshly built
    # TorchScript (export --format torchscript) compiles forward only: not the provenance or the property.
    __jit_ignored_attributes__ = ["source"]
    __jit_unused_properties__ = ["classifier"]

    def __init__(self, trunk: nn.Sequential, head: nn.Sequential) -> None:
        super().__init__()
        if not isinstance(head[-1], nn.Linear):
            raise TypeError(f"the head must end with an nn.Linear, got {type(head[-1]).__name__}")
        self.trunk = trunk
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x))

    def features(self, x: Tensor) -> Tensor:
        """Pooled penultimate features: the input of the classifier."""
        return self.head[:-1](self.trunk(x))

    @property
    def classifier(self) -> nn.Linear:
        return self.head[-1]


def init_cifar_weights(
    model: nn.Module, *, linear_std: float | None = None, zero_linear_bias: bool = True
) -> None:
    """He init (fan-out) for convolutions with zero bias, identity BatchNorm, as the CRD models do.

    The official files differ only in the classifier, hence the two switches: `linear_std` draws
    its weight from N(0, linear_std^2) (CRD's VGG and MobileNetV2, torchvision's MobileNetV2), None
    keeps PyTorch's default; `zero_linear_bias` False keeps PyTorch's default bias (CRD's ResNets).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(module.weight, 0.0, linear_std)
            if zero_linear_bias:
                nn.init.zeros_(module.bias)


def classifier_head(*last_stage: nn.Module, features: int, num_classes: int) -> nn.Sequential:
    """The head: the last stage's modules, global average pooling, flatten, linear classifier.

    Adaptive pooling makes the models accept any input size (8x8 digits up to 224x224 ImageNet).
    """
    return nn.Sequential(
        *last_stage,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(features, num_classes),
    )


def conv_bn(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
    )
