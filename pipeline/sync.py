"""The method registry as DVC sees it: ``registry.yaml`` (dvc.yaml's ``vars``) and params.yaml's
``methods:`` section.

``dvc.yaml`` cannot import Python, so ``python -m pipeline sync`` writes what the stages iterate over:
which methods train from scratch, which distil from the trained teacher, which have a search space,
and the series of the curated plots.

It also writes every method's effective coefficients into params.yaml. A method's defaults are the
paper's and live in its file, but DVC can only compare what a params file says: with overrides alone,
``dvc exp run -S methods.kd.temperature=2`` diffs as ``- → 2`` and ``dvc exp show`` leaves the baseline's
cell empty. So params.yaml holds the values a run uses, like every other section of it, and the method
file stays where a default is decided: registry.yaml records the defaults the last sync wrote, and a
value in params.yaml that still equals its recorded default follows the method file when that default
changes; a value that differs is the user's and stays. Round-trip YAML (ruamel, as ``dvc exp run -S``
itself edits the file) keeps the user's comments and layout.

``--check`` (a test runs it on the committed files) fails when either file lags the registry, so a method
added as one file, or a default changed in one, cannot be forgotten by the pipeline.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from reproduce.config import ConfigError
from reproduce.io import atomic_write_text
from reproduce.methods.base import Method, MethodKind, registered

REGISTRY_FILE = Path("registry.yaml")
HEADER = ("# Generated from the method registry (reproduce/methods/) by `python -m pipeline sync`,\n"
          "# which `make repro` runs first. Do not edit: add or change a method file and rerun the command.\n")


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
    """What the DVC stages iterate over, derived from the registry, and the defaults this sync writes."""
    methods = selected(only)
    return {"registry": {
        "standalone": [cls.name for cls in methods if cls.kind is not MethodKind.OFFLINE],
        "distill": [cls.name for cls in methods if cls.kind is MethodKind.OFFLINE],
        "sweep": [cls.name for cls in methods if cls.search_space],
        # The series of dvc.yaml's curated plots (reports/plots/*.tsv, a column per method).
        "plot_columns": {network: [cls.name for cls in methods if network in trained_networks(cls)]
                         for network in ("student", "teacher")},
    }, "defaults": {cls.name: cls.default_params() for cls in methods}}


def sync(params_path: Path = Path("params.yaml"), registry_path: Path = REGISTRY_FILE,
         only: list[str] | None = None) -> list[str]:
    """Write every method's coefficients into params.yaml and the lists into registry.yaml; returns what changed."""
    lists = method_lists(only)
    recorded = {}
    if registry_path.exists():
        recorded = (yaml.safe_load(registry_path.read_text()) or {}).get("defaults") or {}
    filled = write_coefficients(params_path, selected(only), recorded)
    changed = [f"{params_path} (methods: {', '.join(filled)})"] if filled else []
    text = HEADER + yaml.safe_dump(lists, sort_keys=False, width=120)
    if not registry_path.exists() or registry_path.read_text() != text:
        atomic_write_text(registry_path, text)
        changed.insert(0, str(registry_path))
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


def write_coefficients(params_path: Path, methods: list[type[Method]], recorded: dict[str, dict[str, Any]]) -> list[str]:
    """Give each method's entry under ``methods:`` every coefficient: a missing one, or one that still
    equals the default recorded by the last sync, gets the method file's default. Returns the methods
    whose entry changed; a coefficient the method does not have is a ConfigError naming it."""
    round_trip = YAML()
    round_trip.preserve_quotes = True
    round_trip.width = 4096  # never re-wrap the user's lines
    document = round_trip.load(params_path.read_text())
    if not isinstance(document, dict):
        raise ConfigError(f"{params_path}: expected a mapping of sections (dataset:, recipe:, methods:, ...)")
    section = document.get("methods")
    if section is None:
        section = document["methods"] = CommentedMap()
    if not isinstance(section, dict):
        raise ConfigError(f"{params_path}: `methods:` must map method names to their coefficients")
    changed = []
    for cls in methods:
        entry = section.get(cls.name)
        if entry is None:
            entry = CommentedMap()
            _insert_in_order(section, cls.name, entry, [other.name for other in registered()])
        if not isinstance(entry, dict):
            raise ConfigError(f"{params_path}: methods.{cls.name} must be a mapping of coefficients, e.g. {{}}")
        cls.parse_params(dict(entry))  # an unknown or invalid coefficient: one line naming methods.<name>.<key>
        before = recorded.get(cls.name, {})
        updated = False
        for position, (key, default) in enumerate(cls.default_params().items()):
            if key not in entry:
                entry.insert(min(position, len(entry)), key, default)
            elif key in before and entry[key] == before[key] and entry[key] != default:
                entry[key] = default
            else:
                continue
            updated = True
        if updated:
            entry.fa.set_block_style()
            changed.append(cls.name)
    if changed:
        _keep_the_closing_blank_line(section)
        text = io.StringIO()
        round_trip.dump(document, text)
        atomic_write_text(params_path, text.getvalue())
    return changed



def _insert_in_order(section: CommentedMap, name: str, entry: CommentedMap, order: list[str]) -> None:
    """Add a method's entry where the registry's order puts it."""
    position = sum(1 for other in section if other in order and order.index(other) < order.index(name))
    section.insert(position, name, entry)


def _keep_the_closing_blank_line(section: CommentedMap) -> None:
    """ruamel keeps the blank line that closes ``methods:`` as the comment of the last key of an entry; after
    an entry is added at the end, move it down to the new last entry's last key."""
    entries = [value for value in section.values() if isinstance(value, CommentedMap) and len(value)]
    for earlier in entries[:-1]:
        last = list(earlier)[-1]
        comment = earlier.ca.items.get(last)
        if comment and comment[2] is not None and comment[2].value.startswith("\n\n"):
            final = entries[-1]
            final.ca.items[list(final)[-1]] = earlier.ca.items.pop(last)
