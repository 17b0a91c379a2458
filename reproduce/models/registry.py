"""The zoo's registry: the suite's one extension pattern (reproduce/registry.py) for models.

A model file registers a factory ``(num_classes, in_channels) -> SplitNet`` with ``@register("name")``.
"""

from collections.abc import Callable

from reproduce.models.base import SplitNet
from reproduce.registry import Registry

Factory = Callable[[int, int], SplitNet]
"""Builds a fresh model from (num_classes, in_channels)."""

MODELS: Registry[Factory] = Registry("model", "reproduce.models")
register = MODELS.register


def available() -> list[str]:
    return MODELS.names()


def create(name: str, num_classes: int, in_channels: int = 3) -> SplitNet:
    """A freshly initialised model from the registry; an unknown name is a ConfigError listing the choices."""
    return MODELS.get(name)(num_classes, in_channels)
