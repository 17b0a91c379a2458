"""The command line (python -m reproduce): one module per command, one-line errors with exit code 2,
and a --help that imports nothing heavy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reproduce.cli import COMMANDS, main
from reproduce.cli.methods import describe_range

PROJECT = Path(__file__).resolve().parent.parent
PARAMS = str(PROJECT / "params.yaml")


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The whole of stderr, which must be one line."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_every_command_is_a_registered_module() -> None:
    assert {"prepare", "train", "recipe", "methods"} <= set(COMMANDS.names())
    for name, command in COMMANDS.items():
        assert command.name == name and command.help and "\n" not in command.help


@pytest.mark.parametrize(("argv", "message"), [
    (["prepare", "--set", "dataset.name=cifar1000"],
     "error: dataset.name: unknown dataset 'cifar1000' (did you mean 'cifar100'?); available: cifar10, cifar100"),
    (["train", "--method", "kd", "--set", "models.student=resnet9"],
     "error: models.student: unknown model 'resnet9' (did you mean 'resnet8'?); available: "),
    (["train", "--method", "kd", "--seed", "-1"], "error: --seed -1: a seed must be >= 0"),
    (["train", "--method", "kdd"], "error: --method: unknown method 'kdd' (did you mean 'kd'?)"),
    (["train", "--method", "kd", "--set", "recipe.optimizer.lr=.inf"],
     "error: recipe.optimizer.lr: must be a finite number, got inf"),
    (["train", "--method", "kd", "--stop-after-epoch", "0"], "error: --stop-after-epoch 0: must be >= 1"),
    (["recipe", "configs/papers/nothing.yaml"], "error: configs/papers/nothing.yaml: no such recipe; available: "),
])
def test_user_errors_are_one_line_with_exit_code_2_before_any_data_loads(
        argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(PROJECT)
    prepared = tmp_path / "prepared"
    assert main([*argv, "--params", PARAMS, "--set", f"dataset.prepared_root={prepared}"]) == 2
    assert error_line(capsys).startswith(message)
    assert not prepared.exists()  # failed at config load: nothing was read or written


@pytest.mark.parametrize(("text", "message"), [
    ("", "is empty: it would silently train the code's defaults"),
    ("dataset:\n  name: digits\n recipe: [1,\n", ", line 3, column 2: not valid YAML"),
])
def test_an_empty_or_garbage_params_file_is_one_line(text: str, message: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(text)
    assert main(["train", "--method", "kd", "--params", str(params)]) == 2
    line = error_line(capsys)
    assert f"error: {params}" in line and message in line and "<unicode string>" not in line


def test_a_garbage_overlay_names_its_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overlay = tmp_path / "best_params.yaml"
    overlay.write_text("methods: {kd: {temperature: 3}\n")
    assert main(["train", "--method", "kd", "--params", PARAMS, "--params-from", str(overlay)]) == 2
    assert f"error: {overlay}, line 2, column 1: not valid YAML" in error_line(capsys)


def test_methods_lists_each_search_parameter_with_its_range(capsys: pytest.CaptureFixture[str]) -> None:
    from reproduce.methods.base import registered

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for cls in registered():
        assert f"{cls.name:9s} {cls.display_name:18s} {cls.kind.value}" in out
        for name, spec in cls.search_space.items():
            assert f"{name} {describe_range(spec)}" in out
    assert describe_range({"type": "float", "low": 0.25, "high": 4, "log": True}) == "float 0.25..4 log"
    assert describe_range({"type": "int", "low": 1, "high": 8, "step": 2}) == "int 1..8 step 2"
    assert describe_range({"type": "categorical", "choices": ["hard", "soft"]}) == "one of hard, soft"


@pytest.mark.slow
def test_a_finished_run_says_already_done_and_not_wrote(prepared_root: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "dataset": {"name": "digits", "prepared_root": str(prepared_root), "augment": {"crop_padding": 1, "flip": False}},
        "models": {"teacher": "resnet8", "student": "resnet8"},
        "recipe": {"epochs": 1, "schedule": {"name": "cosine", "milestones": []}},
        "runtime": {"quiet": True, "threads": 1}}))
    argv = ["train", "--method", "vanilla", "--params", str(params), "--out", str(tmp_path / "run"), "--no-track"]
    assert main(argv) == 0
    assert f"wrote {tmp_path / 'run' / 'metrics.json'}" in capsys.readouterr().out
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "already done" in again and "wrote" not in again


HEAVY = ("torch", "mlflow", "wandb", "optuna", "pandas", "matplotlib")


def _imported_after_help(package: str, *args: str) -> list[str]:
    """The heavy modules a fresh interpreter holds after ``python -m <package> <args> --help``."""
    script = (f"import runpy, sys; sys.argv = [{package!r}, *{list(args)!r}, '--help']\n"
              f"try:\n    runpy.run_module({package!r}, run_name='__main__')\n"
              f"except SystemExit as done:\n    assert done.code == 0, done.code\n"
              f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return eval(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_help_of_every_command_imports_nothing_heavy() -> None:
    assert _imported_after_help("reproduce") == []
    for name in COMMANDS.names():
        assert _imported_after_help("reproduce", name) == [], name
    assert _imported_after_help("sweeps") == []
    assert _imported_after_help("analysis") == []
