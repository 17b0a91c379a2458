"""The method registry as DVC sees it: ``registry.yaml`` (dvc.yaml's ``vars``) and params.yaml's
``methods:`` entries.

``dvc.yaml`` cannot import Python, so ``python -m pipeline sync`` writes what the stages iterate over:
which methods train from scratch, which distil from the trained teacher, which have a search space,
and the series of the curated plots. It also gives every registered method an entry under
``methods:`` in params.yaml, because DVC tracks ``methods.<name>`` per stage and refuses a stage
whose parameter key is missing. ``--check`` (a test runs it on the committed files) fails when either
file lags the registry, so a method added as one file cannot be forgotten by the pipeline.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

from reproduce.config import ConfigError
from reproduce.io import atomic_write_text
from reproduce.methods.base import Method, MethodKind, registered

REGISTRY_FILE = Path("registry.yaml")
HEADER = ("# Generated from the method registry (reproduce/methods/) by `python -m pipeline sync`,\n"
          "# which `make repro` runs first. Do not edit: add a method file and rerun the command.\n")


def trained_networks(cls: type[Method]) -> list[str]:
    """The networks a method trains whose curves and numbers are compared: the primary network, plus the
    teacher of an online method (a frozen teacher's numbers are the `teacher` method's, in every run)."""
    return [cls.primary] + (["teacher"] if cls.kind is MethodKind.ONLINE and cls.primary != "teacher" else [])


def selected(only: list[str] | None = None) -> list[type[Method]]:
    """The registered methods in table order (``only``: a subset, for quick pipelines and tests)."""
    methods = [cls for cls in registered() if only is None or cls.name in only]
    if only is not None and len(methods) != len(set(only)):
        known = sorted(cls.name for cls in registered())
        raise ConfigError(f"--only: unknown method(s) {', '.join(sorted(set(only) - set(known)))}; "
                          f"registered: {', '.join(known)}")
    return methods


def method_lists(only: list[str] | None = None) -> dict[str, Any]:
    """What the DVC stages iterate over, derived from the registry."""
    methods = selected(only)
    return {"registry": {
        "standalone": [cls.name for cls in methods if cls.kind is not MethodKind.OFFLINE],
        "distill": [cls.name for cls in methods if cls.kind is MethodKind.OFFLINE],
        "sweep": [cls.name for cls in methods if cls.search_space],
        # The series of dvc.yaml's curated plots (reports/plots/*.tsv, a column per method).
        "plot_columns": {network: [cls.name for cls in methods if network in trained_networks(cls)]
                         for network in ("student", "teacher")},
    }}


def sync(params_path: Path = Path("params.yaml"), registry_path: Path = REGISTRY_FILE,
         only: list[str] | None = None) -> list[str]:
    """Write registry.yaml and give every listed method an entry in params.yaml; returns what changed."""
    changed = []
    lists = method_lists(only)
    text = HEADER + yaml.safe_dump(lists, sort_keys=False, width=120)
    if not registry_path.exists() or registry_path.read_text() != text:
        atomic_write_text(registry_path, text)
        changed.append(str(registry_path))
    missing = add_method_entries(params_path, lists["registry"]["standalone"] + lists["registry"]["distill"])
    if missing:
        changed.append(f"{params_path} (methods: {', '.join(missing)})")
    return changed


def stale(params_path: Path, registry_path: Path = REGISTRY_FILE, only: list[str] | None = None) -> list[str]:
    """What ``sync`` would change, without changing it (``python -m pipeline sync --check``)."""
    with tempfile.TemporaryDirectory() as scratch:
        params_copy, registry_copy = Path(scratch) / "params.yaml", Path(scratch) / "registry.yaml"
        params_copy.write_text(params_path.read_text())
        if registry_path.exists():
            registry_copy.write_text(registry_path.read_text())
        changed = sync(params_copy, registry_copy, only)
    return [item.replace(str(registry_copy), str(registry_path)).replace(str(params_copy), str(params_path))
            for item in changed]


def add_method_entries(params_path: Path, names: list[str]) -> list[str]:
    """Append ``  <name>: {}`` under params.yaml's top-level ``methods:`` for each missing name. Text,
    not a YAML round trip, so the user's comments and layout survive."""
    text = params_path.read_text()
    raw = yaml.safe_load(text) or {}
    present = raw.get("methods") or {}
    missing = [name for name in names if name not in present]
    if not missing:
        return []
    block = re.search(r"^methods:[^\n]*\n((?:[ \t]+[^\n]*\n|[ \t]*\n)*)", text, flags=re.MULTILINE)
    lines = "".join(f"  {name}: {{}}\n" for name in missing)
    if block is None:
        text = text.rstrip("\n") + "\n\nmethods:\n" + lines
    elif block.group(0).startswith("methods: {}"):
        text = text[:block.start()] + "methods:\n" + lines + text[block.start() + len("methods: {}\n"):]
    else:
        text = text[:block.end(1)] + lines + text[block.end(1):]
    if not isinstance((yaml.safe_load(text) or {}).get("methods"), dict):
        raise ConfigError(f"{params_path}: could not add methods {missing} under `methods:`; add `{missing[0]}: {{}}` "
                          f"there by hand")
    atomic_write_text(params_path, text)
    return missing
