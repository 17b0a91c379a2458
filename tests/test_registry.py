"""The pipeline is derived from the method registry, and DVC's deps are complete by construction.

- registry.yaml and params.yaml agree with the registry (`python -m pipeline sync --check`), so
  every registered method appears in the training stages, the sweeps (if it has a search space) and
  the analysis' inputs.
- Every project module that a stage's command imports (followed statically through every import,
  including the ones inside functions) is covered by that stage's deps, so editing any of them
  reruns the stage: DVC never serves stale results.
"""

from __future__ import annotations

import ast
import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reproduce.config import ConfigError
from reproduce.methods import get_method
from reproduce.methods.base import MethodKind, registered
from pipeline.__main__ import main
from pipeline.sync import method_lists, stale, sync

PROJECT = Path(__file__).resolve().parent.parent
PACKAGES = ("reproduce", "sweeps", "analysis", "pipeline")


def test_committed_registry_and_params_agree_with_the_registry() -> None:
    assert stale(PROJECT / "params.yaml", PROJECT / "registry.yaml") == []


@pytest.mark.slow
def test_the_sync_check_command_passes_on_the_committed_files() -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline", "sync", "--check"], cwd=PROJECT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_registered_method_is_trained_swept_and_analysed() -> None:
    lists = yaml.safe_load((PROJECT / "registry.yaml").read_text())["registry"]
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    for cls in registered():
        assert cls.name in lists["standalone"] + lists["distill"], cls.name
        assert (cls.name in lists["distill"]) == (cls.kind is MethodKind.OFFLINE)
        assert (cls.name in lists["sweep"]) == bool(cls.search_space), cls.name
        assert cls.name in lists["plot_columns"][cls.primary if cls.primary == "teacher" else "student"]
        # Every coefficient, at the method file's default unless params.yaml overrides it (DVC diffs values).
        assert set(params["methods"][cls.name]) == set(cls.default_params()), f"params.yaml methods.{cls.name}"
        assert cls.display_name and isinstance(cls.row_order, int)
    assert "teacher" in lists["standalone"]


def _project_copy(tmp_path: Path) -> tuple[Path, Path]:
    for name in ("params.yaml", "registry.yaml"):
        shutil.copy2(PROJECT / name, tmp_path / name)
    return tmp_path / "params.yaml", tmp_path / "registry.yaml"


def test_sync_writes_a_new_methods_defaults_and_keeps_the_users_comments(tmp_path: Path) -> None:
    params, registry = _project_copy(tmp_path)
    original = params.read_text()
    kd_block = original[original.index("  kd:\n"):original.index("  dkd:\n")]
    params.write_text(original.replace(kd_block, ""))
    assert sync(params, registry) == [f"{params} (methods: kd)"]
    assert params.read_text() == original  # the same place, the same layout, every comment kept
    assert yaml.safe_load(params.read_text())["methods"]["kd"] == get_method("kd").default_params()
    assert sync(params, registry) == []  # a second sync changes nothing


def test_sync_follows_a_changed_default_and_keeps_an_override(tmp_path: Path) -> None:
    """registry.yaml records the defaults the last sync wrote: a value still equal to its recorded default
    follows the method file, a value the user changed stays."""
    params, registry = _project_copy(tmp_path)
    recorded = yaml.safe_load(registry.read_text())
    recorded["defaults"]["kd"]["temperature"] = 5.0  # as if kd.py's default was 5 at the last sync ...
    registry.write_text(yaml.safe_dump(recorded, sort_keys=False))
    raw = yaml.safe_load(params.read_text())
    assert raw["methods"]["dkd"]["warmup_epochs"] != get_method("dkd").default_params()["warmup_epochs"]  # an override
    params.write_text(params.read_text().replace("    temperature: 4.0\n    ce_weight: 0.1\n",
                                                 "    temperature: 5.0\n    ce_weight: 0.1\n"))  # ... and written
    assert yaml.safe_load(params.read_text())["methods"]["kd"]["temperature"] == 5.0
    assert stale(params, registry)  # --check notices
    sync(params, registry)
    methods = yaml.safe_load(params.read_text())["methods"]
    assert methods["kd"]["temperature"] == 4.0 and methods["dkd"]["warmup_epochs"] == raw["methods"]["dkd"]["warmup_epochs"]
    # A value the user set differs from the recorded default: it stays when the default moves.
    recorded = yaml.safe_load(registry.read_text())
    recorded["defaults"]["kd"]["ce_weight"] = 0.3
    registry.write_text(yaml.safe_dump(recorded, sort_keys=False))
    sync(params, registry)
    assert yaml.safe_load(params.read_text())["methods"]["kd"]["ce_weight"] == 0.1


def test_sync_names_an_unknown_coefficient(tmp_path: Path) -> None:
    params, registry = _project_copy(tmp_path)
    params.write_text(params.read_text().replace("    kd_weight: 0.9\n", "    kd_weight: 0.9\n    temprature: 2\n", 1))
    with pytest.raises(ConfigError, match=r"methods\.kd.*temprature"):
        sync(params, registry)


def test_sync_check_fails_when_the_registry_file_is_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("params.yaml", "registry.yaml"):
        shutil.copy2(PROJECT / name, tmp_path / name)
    lists = method_lists()
    lists["registry"]["standalone"].remove("vanilla")
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump(lists))
    monkeypatch.chdir(tmp_path)
    assert main(["sync", "--check"]) == 1
    assert "out of date: registry.yaml" in capsys.readouterr().err
    assert (tmp_path / "registry.yaml").read_text() == yaml.safe_dump(lists)  # --check changes nothing


# ----------------------------------------------------------------------------------------------
# Layers (issue 18.4): the library knows nothing of the layers above it

# Each top-level package and the packages it may import: sweeps and analysis use the library, the DVC
# glue (pipeline) uses all three, and nothing imports pipeline.
LAYERS = {"reproduce": set(), "sweeps": {"reproduce"}, "analysis": {"reproduce"},
          "pipeline": {"reproduce", "sweeps", "analysis"}}


def layer_violations(layers: dict[str, set[str]]) -> list[str]:
    """Every import (function-level ones included) of a project package its layer may not use."""
    problems = []
    for package, allowed in layers.items():
        for path in sorted((PROJECT / package).rglob("*.py")):
            for name in imported_names([ast.parse(path.read_text())]):
                top = name.split(".")[0]
                if top in layers and top != package and top not in allowed:
                    problems.append(f"{path.relative_to(PROJECT)} imports {name}")
    return sorted(set(problems))


def test_each_layer_imports_only_the_layers_below_it() -> None:
    assert layer_violations(LAYERS) == []
    # The check can fail: pipeline imports the library, which the library's own layer may not do.
    assert any(item.startswith("pipeline/") for item in layer_violations({**LAYERS, "pipeline": set()}))


# ----------------------------------------------------------------------------------------------
# Deps completeness


def module_file(name: str) -> Path | None:
    """The project file of module ``name`` (a package's __init__.py), or None outside the project."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = PROJECT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_names(nodes: list[ast.AST]) -> list[str]:
    """Module names imported anywhere inside ``nodes`` (``from a.b import c`` gives a.b and a.b.c)."""
    names: list[str] = []
    for node in (inner for outer in nodes for inner in ast.walk(outer)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, "relative import; the project imports absolutely"
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def project_files(names: list[str]) -> list[Path]:
    """The project files behind module names, with every enclosing package's __init__.py."""
    files = []
    for name in names:
        parts = name.split(".")
        files += [found for depth in range(1, len(parts) + 1) if (found := module_file(".".join(parts[:depth])))]
    return files


def imported_files(start: list[Path]) -> set[Path]:
    """Every project file reachable from ``start`` through import statements anywhere in the code
    (function-level imports included: most of this project imports lazily). Imports done by name at
    run time (the method registry's pkgutil loop) are not followed: a stage names its method's file."""
    seen: set[Path] = set()
    todo = list(start)
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += project_files(imported_names([ast.parse(path.read_text())]))
    return seen


def command_code(entry: Path, command: str) -> tuple[list[ast.AST], list[Path]]:
    """The code ``python -m <package> <command>`` runs, and the files it is in. Two layouts: a ``COMMANDS``
    table in __main__.py mapping names to its functions (pipeline/), or a ``cli/`` package whose module
    for the command registers ``Command("<command>", ...)`` (reproduce/): that module, read whole."""
    tree = ast.parse(entry.read_text())
    table = next((node.value for node in tree.body if isinstance(node, ast.Assign)
                  and any(isinstance(t, ast.Name) and t.id == "COMMANDS" for t in node.targets)), None)
    if table is None:
        registers = re.compile(rf"Command\(\s*[\"']{re.escape(command)}[\"']")
        modules = [path for path in sorted((entry.parent / "cli").glob("*.py")) if registers.search(path.read_text())]
        assert len(modules) == 1, f"{command!r}: expected one module of {entry.parent / 'cli'} to register it"
        return [tree, ast.parse(modules[0].read_text())], [entry, modules[0]]
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    commands = {key.value: value.id for key, value in zip(table.keys, table.values)}
    assert command in commands, f"{command!r} is not in {entry}'s COMMANDS"
    top_level = [node for node in tree.body if not isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    used = [functions[commands[command]], *(functions[name] for name in ("main", "_common") if name in functions)]
    return top_level + used, [entry]


def stage_imports(cmd: str) -> set[Path]:
    """What ``python -m <package> [<command>] [--method M]`` imports: the entry module's top level, the code
    of its command (``command_code``), everything those import, and M's file."""
    words = cmd.split()
    assert words[:2] == ["python", "-m"], f"stage command {cmd!r}: expected `python -m <package> ...`"
    entry = PROJECT / words[2] / "__main__.py"
    if len(words) > 3 and not words[3].startswith("-"):
        nodes, files = command_code(entry, words[3])
    else:  # a single-command entry point runs its whole module
        nodes, files = [ast.parse(entry.read_text())], [entry]
    found = set(files) | imported_files(project_files(imported_names(nodes)))
    if "--method" in words:
        found |= imported_files([PROJECT / "reproduce" / "methods" / f"{words[words.index('--method') + 1]}.py"])
    return found


def uncovered(cmd: str, deps: list[str]) -> list[str]:
    files = stage_imports(cmd)
    roots = [PROJECT / dep for dep in deps]
    return sorted(str(f.relative_to(PROJECT)) for f in files if not any(f == r or r in f.parents for r in roots))


def resolved_stages() -> dict[str, dict]:
    """dvc.yaml's stages as DVC resolves them (foreach expanded), with their command and deps."""
    from dvc.repo import Repo

    with Repo(str(PROJECT)) as repo:
        return {stage.addressing: {"cmd": stage.cmd, "deps": [dep.def_path for dep in stage.deps]}
                for stage in repo.index.stages if stage.cmd}


@pytest.fixture(scope="module")
def stages() -> dict[str, dict]:
    return resolved_stages()


@pytest.mark.slow  # loads the DVC project
def test_every_stage_depends_on_every_project_module_its_command_imports(stages: dict[str, dict]) -> None:
    assert {"prepare", "analysis", "train@teacher", "train@dml", "distill@r2kd"} <= set(stages)
    problems = {name: missing for name, stage in stages.items() if (missing := uncovered(stage["cmd"], stage["deps"]))}
    assert not problems, f"stages miss deps on modules they import: {problems}"


@pytest.mark.slow
def test_the_deps_check_catches_a_missing_module(stages: dict[str, dict]) -> None:
    stage = copy.deepcopy(stages["distill@r2kd"])
    assert "reproduce/data/augment.py" in {str(f.relative_to(PROJECT)) for f in stage_imports(stage["cmd"])}
    stage["deps"] = [dep for dep in stage["deps"] if dep != "reproduce/data"]
    assert "reproduce/data/augment.py" in uncovered(stage["cmd"], stage["deps"])
    stage = copy.deepcopy(stages["train@dml"])
    stage["deps"].remove("reproduce/losses.py")
    assert uncovered(stage["cmd"], stage["deps"]) == ["reproduce/losses.py"]
