"""End to end: a real, tiny `dvc repro` of the embedded pipeline in a copy of the project.

Marked slow (a few minutes on 2 cores); CI runs it. It checks what a user relies on: every stage
runs, metrics reach `dvc metrics show`, a second `dvc repro` does nothing, and changing one method's
coefficient invalidates only that method's stages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parent.parent
COPIED = ["reproduce", "sweeps", "analysis", "configs", "params.yaml", "dvc.yaml", ".dvc/config", ".dvc/.gitignore",
          ".dvcignore", ".gitignore"]

pytestmark = pytest.mark.slow


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("project")
    for name in COPIED:
        source = PROJECT / name
        target = root / name
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "results", "studies"))
        elif source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["models"] = {"teacher": "resnet14", "student": "resnet8"}
    params["recipe"]["epochs"] = 2
    params["pipeline"]["seeds"] = [0, 1]
    params["runtime"]["threads"] = 2
    if "sweep" in params:
        params["sweep"]["methods"] = ["kd"]
        params["sweep"]["n_trials"] = 2
        params["sweep"]["epochs_per_trial"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_SITE_CACHE_DIR": str(root / ".dvc" / "site-cache"), "DVC_NO_ANALYTICS": "1",
           "WANDB_DIR": str(root), "PYTHONPATH": "",
           # As the Makefile sets them: wandb must still write its runs into wandb/.
           **{f"WANDB_{kind.upper()}_DIR": str(root / ".wandb-state" / kind) for kind in ("cache", "data", "config")}}
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's own sqlite:///mlflow.db
    _run(["git", "init", "-q"], root, env)
    _run([sys.executable, "-m", "dvc", "repro"], root, env)
    return root, env


def test_dvc_repro_trains_every_method_and_reports(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    methods = params["pipeline"]["standalone"] + params["pipeline"]["distill"]
    for label in ["teacher", *methods]:
        for seed in params["pipeline"]["seeds"]:
            summary = json.loads((root / "runs" / label / f"seed{seed}" / "metrics.json").read_text())
            assert summary["epochs"] == 2 and summary["last"]["test"][summary["primary"]]["top1"] > 10
    shown = json.loads(_run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], root, env))
    text = json.dumps(shown)
    assert "runs/kd/seed1/metrics.json" in text and "runs/switokd/seed0/metrics.json" in text
    training_runs = len(params["pipeline"]["seeds"]) * (1 + len(methods))
    assert (root / "mlflow.db").exists()
    assert len(list((root / "wandb").glob("offline-run-*"))) >= training_runs
    if (root / "reports").exists():
        assert (root / "reports" / "index.html").exists()


def test_second_repro_does_nothing_and_a_coefficient_reruns_only_its_method(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    assert json.loads(_run([sys.executable, "-m", "dvc", "status", "--json"], root, env)) == {}
    out = _run([sys.executable, "-m", "dvc", "repro"], root, env)
    assert "up to date" in out.lower() and "Running stage" not in out

    params_path = root / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["methods"]["kd"]["temperature"] = 2.0
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    changed = set(json.loads(_run([sys.executable, "-m", "dvc", "status", "--json"], root, env)))
    training = {stage for stage in changed if stage.startswith(("train", "distill"))}
    assert training == {f"distill@kd-{seed}" for seed in params["pipeline"]["seeds"]}
    assert not any(stage.startswith("sweep@") and stage != "sweep@kd" for stage in changed)
