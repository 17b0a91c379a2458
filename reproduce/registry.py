"""The one extension pattern: a named registry filled by a decorator, as timm's ``@register_model``.

Methods, models, data sources and tracking backends each have one ``Registry``; adding an extension is
adding a file whose object is decorated with ``@REGISTRY.register("name")`` (or ``@REGISTRY.register``
when the object carries its own ``name``). A registry imports its package on first use, so every file
in that package is registered before a name is looked up."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from reproduce.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str | None = None) -> None:
        """``kind`` names the extension point in errors ("method", "model"); ``package``: the package whose
        modules register into it, imported (every module of it) on the first lookup."""
        self.kind = kind
        self.package = package
        self._items: dict[str, T] = {}
        self._loaded = package is None

    def register(self, name: str | Callable | type | None = None) -> Callable[[T], T] | T:
        """``@registry.register("name")``, or bare ``@registry.register`` for an object with a ``name``."""
        if name is not None and not isinstance(name, str):
            return self._add(getattr(name, "name"), name)  # bare decorator

        def add(item: T) -> T:
            return self._add(name if name is not None else getattr(item, "name"), item)

        return add

    def _add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def get(self, name: str, where: str | None = None) -> T:
        """The item called ``name``; an unknown name is a ``ConfigError`` that lists the choices (and the
        closest one), prefixed by ``where`` (e.g. the config key that named it)."""
        self._load()
        if name not in self._items:
            close = difflib.get_close_matches(str(name), list(self._items), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            prefix = f"{where}: " if where else ""
            raise ConfigError(f"{prefix}unknown {self.kind} {name!r}{hint}; available: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        self._load()
        return iter(sorted(self._items.items()))

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{self.package}.{module.name}")
