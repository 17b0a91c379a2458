"""The single name -> factory registry of the zoo."""

from collections.abc import Callable

from reproduce.models.base import SplitNet

Factory = Callable[[int, int], SplitNet]
"""Builds a fresh model from (num_classes, in_channels)."""

_FACTORIES: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    """Decorator adding a factory to the registry under `name`."""

    def add(factory: Factory) -> Factory:
        if name in _FACTORIES:
            raise ValueError(f"model name {name!r} is registered twice")
        _FACTORIES[name] = factory
        return factory

    return add


def available() -> list[str]:
    return sorted(_FACTORIES)


def create(name: str, num_classes: int, in_channels: int = 3) -> SplitNet:
    """A freshly initialised model from the registry."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; available models: {', '.join(available())}"
        ) from None
    return factory(num_classes, in_channels)
