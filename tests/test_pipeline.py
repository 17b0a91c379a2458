"""End to end: a real, tiny `dvc repro` of the embedded pipeline in a git copy of the project, with a
throw-away method added as one new file and nothing else.

Marked slow (a few minutes on 2 cores); CI runs it. It checks what a user relies on: every registered
method (the new one included) is trained, swept and reported; metrics reach `dvc metrics show`; a
second `dvc repro` does nothing; changing one method's coefficient invalidates only that method's
stages; `dvc exp run -S` works and `dvc exp show` lists both experiments' numbers."""

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
COPIED = ["reproduce", "sweeps", "analysis", "pipeline", "configs", "params.yaml", "dvc.yaml", "registry.yaml", ".dvc/config",
          ".dvc/.gitignore", ".dvcignore", ".gitignore"]
THROWAWAY = '''"""A throw-away method for the pipeline test: KD at its own temperature."""
from dataclasses import dataclass

import torch

from reproduce.losses import cross_entropy, kd_loss
from reproduce.methods.base import Step, TeacherStudentMethod, register


@register
class ThrowAway(TeacherStudentMethod):
    name = "zz_throwaway"
    display_name = "Throw-away KD"
    row_order = 99
    search_space = {"temperature": {"type": "float", "low": 1, "high": 4}}

    @dataclass
    class Params:
        temperature: float = 3.0

    def step(self, x, y, epoch):
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        student_logits = self.student(x)
        return Step(losses={"student": {"ce": cross_entropy(student_logits, y),
                                        "kd": kd_loss(student_logits, teacher_logits, self.params.temperature)}})
'''

pytestmark = pytest.mark.slow


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def _dvc(root: Path, env: dict[str, str], *args: str) -> str:
    return _run([sys.executable, "-m", "dvc", *args], root, env)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("project")
    for name in COPIED:
        source, target = PROJECT / name, root / name
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    (root / "reproduce" / "methods" / "zz_throwaway.py").write_text(THROWAWAY)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["models"] = {"teacher": "resnet8", "student": "resnet8"}
    params["recipe"]["epochs"] = 1
    params["pipeline"]["seeds"] = [0]
    params["runtime"]["threads"] = 2
    params["sweep"].update({"n_trials": 1, "epochs_per_trial": 1})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_SITE_CACHE_DIR": str(root / ".dvc" / "site-cache"), "DVC_NO_ANALYTICS": "1",
           "WANDB_DIR": str(root), "PYTHONPATH": "",
           # As the Makefile sets them: wandb must still write its runs into wandb/.
           **{f"WANDB_{kind.upper()}_DIR": str(root / ".wandb-state" / kind) for kind in ("cache", "data", "config")}}
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's own sqlite:///mlflow.db
    # What `make repro` does: sync with the registry (it finds the new file), then `dvc repro`.
    _run([sys.executable, "-m", "pipeline", "sync"], root, env)
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"]):
        _run(command, root, env)
    _dvc(root, env, "repro")
    return root, env


def test_dvc_repro_trains_sweeps_and_reports_every_method_including_a_new_file(project) -> None:
    from reproduce.methods.base import registered

    root, env = project
    names = [cls.name for cls in registered()] + ["zz_throwaway"]
    assert "zz_throwaway" in (root / "params.yaml").read_text()  # the sync gave it a params entry
    for name in names:
        summary = json.loads((root / "runs" / name / "seed0" / "metrics.json").read_text())
        assert summary["epochs"] == 1 and summary["last"]["test"][summary["primary"]]["top1"] > 10
    swept = [cls.name for cls in registered() if cls.search_space] + ["zz_throwaway"]
    for name in swept:
        assert (root / "sweep-results" / name / "best_params.yaml").exists(), name
    assert "Throw-away KD" in (root / "reports" / "index.html").read_text()
    shown = json.dumps(json.loads(_dvc(root, env, "metrics", "show", "--json")))
    assert "dvclive/zz_throwaway/metrics.json" in shown and "dvclive/switokd/metrics.json" in shown
    assert (root / "mlflow.db").exists()
    assert len(list((root / "wandb").glob("offline-run-*"))) >= len(names)


def test_second_repro_does_nothing_and_a_coefficient_reruns_only_its_method(project) -> None:
    root, env = project
    assert json.loads(_dvc(root, env, "status", "--json")) == {}
    out = _dvc(root, env, "repro")
    assert "Running stage" not in out

    params_path = root / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["methods"]["kd"]["temperature"] = 2.0
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    changed = set(json.loads(_dvc(root, env, "status", "--json")))
    params_path.write_text(original)
    assert {stage for stage in changed if stage.startswith(("train", "distill"))} == {"distill@kd"}


def test_dvc_exp_run_set_param_and_exp_show_lists_both_experiments(project) -> None:
    root, env = project
    _run(["git", "add", "-A"], root, env)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "after repro"], root, env)
    # The README's example. `++` because params.yaml lists only overrides (methods.kd: {}), and DVC's
    # -S (Hydra's grammar) refuses a new key without it; -S rewrites params.yaml, so the unquoted
    # `off` it writes back must still be accepted.
    _dvc(root, env, "exp", "run", "-n", "kd-t2", "-S", "++methods.kd.temperature=2", "-S", "runtime.compile=off")
    table = json.loads(_dvc(root, env, "exp", "show", "--json"))
    rows = [row for baseline in table for row in [baseline, *[exp for exp in baseline.get("experiments") or []
                                                              for exp in [exp["revs"][0]]]]]
    numbers = {}
    for row in rows:
        data = (row.get("data") or {})
        metrics = data.get("metrics", {}).get("dvclive/kd/metrics.json", {}).get("data", {})
        if metrics:
            numbers[row.get("name") or row.get("rev")] = metrics["student"]["test_top1_best"]["mean"]
    assert len(numbers) >= 2 and "kd-t2" in numbers, table
