"""Reading the configuration: a YAML file, overlays deep-merged over it (a paper recipe, a sweep's best
parameters) and ``--set key=value`` overrides, then one validation of the result."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from reproduce.config.base import ConfigError, config_error
from reproduce.config.schema import Config


def read_yaml(path: str | Path, what: str = "parameters file") -> Any:
    """The YAML document of ``path``; a syntax error is one line naming the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what}. Run from the project root, or pass its path.")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        context = f" ({error.context})" if error.context else ""
        raise ConfigError(f"{where}: not valid YAML: {error.problem}{context}; fix that line (`key: value` with a "
                          f"space after the colon, closed brackets and quotes, spaces not tabs)") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not a YAML text file ({' '.join(str(error).split())}); check the path") from None


def load_config(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = (),
                extra: dict[str, Any] | None = None) -> Config:
    """Read ``path``, deep-merge ``extra`` (e.g. a best_params.yaml), apply ``key=value`` overrides."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such parameters file. Run from the project root, or pass --params PATH.")
    raw = read_yaml(path)
    if raw is None:
        defaults = Config.model_construct()
        raise ConfigError(f"{path} is empty: it would silently train the code's defaults ({defaults.models.teacher} -> "
                          f"{defaults.models.student}, {defaults.recipe.epochs} epochs on {defaults.dataset.name}); "
                          f"restore it (git checkout {path}) or write the parameters to use")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level (dataset:, models:, recipe: ...), "
                          f"got {type(raw).__name__}")
    if extra:
        raw = deep_merge(raw, extra)
    for item in overrides:
        apply_override(raw, item)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """A validated ``Config`` from a mapping shaped like params.yaml (missing keys take the defaults)."""
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise config_error(error) from None


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is parsed as YAML (``lr=0.1``,
    ``milestones=[30,60]``, ``flip=false``)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. recipe.epochs=10")
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:  # `analysis:` with nothing under it
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth + 1])} is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"override {item!r}: the value is not valid YAML; quote it, "
                          f"e.g. {key}='\"{text}\"'") from None
