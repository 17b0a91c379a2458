"""The building blocks of the typed config: a pydantic ``Section`` that refuses unknown keys with a "did
you mean", the value types every section uses, and the one translation of pydantic's errors into a
``ConfigError`` that names the dotted key and what it expects.

Types are stricter than pydantic's defaults on purpose: a YAML typo must not be coerced into a value
(``flip: "yes"`` is not a boolean, ``epochs: 2.5`` is not an integer), while what YAML itself writes is
accepted (``5e-4`` without a dot, which YAML 1.1 reads as a string, is a number; ``3.0`` is the integer 3).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from typing import Annotated, Any, ClassVar

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Strict, TypeAdapter, ValidationError,
                      model_validator)
from pydantic_core import PydanticCustomError

from reproduce.errors import ConfigError


# -- values --------------------------------------------------------------------------------------


def _integral_float(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _number_text(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


Integer = Annotated[int, BeforeValidator(_integral_float), Strict()]
Number = Annotated[float, BeforeValidator(_number_text), Strict()]  # int or float; never a bool
Flag = Annotated[bool, Strict()]  # true or false only (YAML has already read yes/on/no/off as booleans)


def _range(check: Any, text: str) -> AfterValidator:
    def validate(value: Any) -> Any:
        if not check(value):
            raise PydanticCustomError("out_of_range", "{message}", {"message": f"{text}, got {value}"})
        return value

    return AfterValidator(validate)


def at_least(low: float) -> AfterValidator:
    return _range(lambda value: value >= low, f"must be >= {low}")


positive = _range(lambda value: value > 0, "must be > 0")
fraction = _range(lambda value: 0 <= value < 1, "must be in [0, 1)")


def matching(pattern: str, expected: str) -> AfterValidator:
    """A string of a given form; ``expected`` says which in the error (``auto, cpu or GPU indices 0,1``)."""
    form = re.compile(pattern)

    def validate(value: str) -> str:
        if not form.fullmatch(value):
            raise PydanticCustomError("form", "{message}", {"message": f"expected {expected}, got {value!r}"})
        return value

    return AfterValidator(validate)


def _switch(on: str) -> BeforeValidator:
    """An on/off setting that also takes YAML booleans: ``dvc exp run -S`` rewrites params.yaml, and an
    unquoted ``off`` is YAML's false."""
    return BeforeValidator(lambda value: (on if value else "off") if isinstance(value, bool) else value)


switch_on = _switch("on")
switch_bf16 = _switch("bf16")


# -- sections ------------------------------------------------------------------------------------


class _ConfigErrorOnCall(type(BaseModel)):  # type: ignore[misc]
    """A section built directly (``ScheduleConfig(name="linear")``) raises a ConfigError too, named from
    its ``section``. Validating a whole config does not call the class, so its errors keep their full
    path (``recipe.roles.teacher.lr``: the optimiser's fields under another key)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as error:
            raise config_error(error, cls.section) from None


class Section(BaseModel, metaclass=_ConfigErrorOnCall):
    """A mapping of params.yaml; ``section`` is its dotted place in the config."""

    model_config = ConfigDict(allow_inf_nan=False)
    section: ClassVar[str] = ""

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, raw: Any) -> Any:
        if raw is None:  # `analysis:` with nothing under it: the defaults
            return {}
        if isinstance(raw, dict):
            for key in raw:
                if key not in cls.model_fields:
                    raise PydanticCustomError("unknown_key", "unknown key",
                                              {"key": str(key), "known": list(cls.model_fields)})
        return raw


def validate_section(cls: type[Section], raw: Any, where: str) -> Any:
    """``cls`` from ``raw``, its errors named from ``where`` (e.g. ``recipe.roles.teacher``)."""
    try:
        return cls.model_validate(raw)
    except ValidationError as error:
        raise config_error(error, where) from None


def build_dataclass(cls: type, raw: dict[str, Any] | None, where: str) -> Any:
    """A (standard library) dataclass from ``raw``, for sections a module owns (a method's ``Params``):
    unknown keys, wrong types and non-finite numbers are ``ConfigError``s naming ``where.key``; then the
    dataclass's own ``validate()``, if it has one."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in raw:
        if key not in known:
            raise ConfigError(unknown_key_message(where, str(key), known))
    hints = typing.get_type_hints(cls)
    values = {key: _scalar(hints[key], value, join(where, key)) for key, value in raw.items()}
    try:
        built = TypeAdapter(cls).validate_python(values)
    except ValidationError as error:
        raise config_error(error, where) from None
    check_finite(dataclasses.asdict(built), where)
    validate = getattr(built, "validate", None)
    if validate is not None:
        validate()
    return built


# A dataclass's plain bool, int and float fields take the config's values, not pydantic's lax ones
# (which would read "yes" as true).
_SCALARS = {bool: TypeAdapter(Flag), int: TypeAdapter(Integer), float: TypeAdapter(Number)}


def _scalar(hint: Any, value: Any, where: str) -> Any:
    if hint not in _SCALARS:
        return value
    try:
        return _SCALARS[hint].validate_python(value)
    except ValidationError as error:
        raise config_error(error, where) from None


# -- errors --------------------------------------------------------------------------------------


def unknown_key_message(where: str, key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {join(where, close[0])!r}?)" if close else f"; known keys: {', '.join(sorted(known))}"
    return f"unknown key {join(where, key)!r}{hint}"


_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "bool_type": "true or false", "bool_parsing": "true or false",
    "float_type": "a number", "float_parsing": "a number",
    "string_type": "a string", "list_type": "a list",
    "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
    "dataclass_type": "a mapping",
}


def config_error(error: ValidationError, where: str = "") -> ConfigError:
    """The first of pydantic's errors as one line: ``dotted.key: what is wrong, got VALUE``."""
    first = error.errors(include_url=False)[0]
    context = first.get("ctx") or {}
    if isinstance(context.get("error"), ConfigError):  # raised by a check that names its own key
        return context["error"]
    path = where
    for part in first["loc"]:
        path = f"{path}[{part}]" if isinstance(part, int) else join(path, part)
    kind, value = first["type"], first.get("input")
    if kind == "unknown_key":
        return ConfigError(unknown_key_message(path, context["key"], context["known"]))
    if kind in _EXPECTED:
        return ConfigError(f"{path or 'params'}: expected {_EXPECTED[kind]}, got {value!r}")
    if kind == "finite_number":
        return ConfigError(non_finite_message(path, value))
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", context["expected"])  # pydantic's "'a', 'b' or 'c'"
        return ConfigError(f"{path}: {value!r} is not one of {', '.join(choices)}")
    return ConfigError(f"{path}: {first['msg']}")


def non_finite_message(where: str, value: Any) -> str:
    return f"{where}: must be a finite number, got {value} (write a number such as 0.1, not .inf or .nan)"


def check_finite(value: Any, where: str) -> None:
    """Every float in ``value`` (mappings and lists walked) is finite; a sections typed ``Any`` (method
    coefficients, per-role optimisers, search spaces) are checked here."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(non_finite_message(where, value))
    if isinstance(value, dict):
        for key, item in value.items():
            check_finite(item, join(where, key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_finite(item, f"{where}[{index}]")


def check_choice(value: str, choices: tuple[str, ...] | list[str], where: str) -> str:
    if value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)
