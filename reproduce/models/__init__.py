"""Model zoo: every model is a SplitNet built by name through one registry; pretrained weights through
``load_pretrained`` (reproduce/models/pretrained.py)."""

# Imported for their side effect: their @register calls fill the registry.
from reproduce.models import (  # noqa: F401
    imagenet,
    mobilenetv1,
    mobilenetv2,
    resnet_cifar,
    shufflenet,
    switokd_wrn,
    vgg,
    wrn,
)
from reproduce.models.base import SplitNet
from reproduce.models.pretrained import PretrainedError, PretrainedSource, load_pretrained
from reproduce.models.registry import available, create, register

__all__ = ["PretrainedError", "PretrainedSource", "SplitNet", "available", "create", "load_pretrained", "register"]
