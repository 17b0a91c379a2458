"""The one extension pattern (reproduce/registry.py): register by decorator, look up with a clear error."""

from __future__ import annotations

import pytest

from reproduce.errors import ConfigError, UserError
from reproduce.registry import Registry


def test_named_and_bare_registration_and_lookup() -> None:
    things: Registry[object] = Registry("thing")

    @things.register("first")
    def first() -> None: ...

    @things.register
    class Second:
        name = "second"

    assert things.names() == ["first", "second"]
    assert things.get("first") is first and things.get("second") is Second
    assert "second" in things and "third" not in things


def test_an_unknown_name_lists_the_choices_and_the_closest_one() -> None:
    things: Registry[int] = Registry("model")
    things.register("resnet8")(8)
    things.register("resnet110")(110)
    with pytest.raises(ConfigError, match=r"^models.student: unknown model 'resnet9' \(did you mean 'resnet8'\?\); "
                                          r"available: resnet110, resnet8$"):
        things.get("resnet9", "models.student")
    assert issubclass(ConfigError, UserError)


def test_registering_a_name_twice_is_refused() -> None:
    things: Registry[int] = Registry("method")
    things.register("kd")(1)
    with pytest.raises(ValueError, match="method 'kd' is registered twice"):
        things.register("kd")(2)


def test_a_package_registry_imports_its_modules_on_first_lookup() -> None:
    methods: Registry[type] = Registry("method", package="reproduce.methods")
    assert methods._items == {}  # nothing imported yet through this registry
    with pytest.raises(ConfigError, match="unknown method"):
        methods.get("no-such-method")
