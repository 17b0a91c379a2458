"""The DVC pipeline: its headline metrics (fast, below) and, end to end, a real tiny `dvc repro` of the
embedded pipeline in a git copy of the project, with a throw-away method added as one new file and nothing
else (slow: 7 minutes on 2 cores, 6 of them the first `dvc repro`; CI runs it).

End to end it checks what a user relies on: every registered method (the new one included) is trained,
swept and reported; a second `dvc repro` does nothing; changing one method's coefficient invalidates only
that method's stages; after `dvc exp run -S methods.kd.temperature=2`, `dvc exp show` on a 120-column
terminal shows both experiments' KD headline numbers and `dvc exp diff` lists only KD's metrics and
`methods.kd.temperature 4.0 -> 2`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import headline as headline_module
from pipeline.headline import changed_methods, headline, write_headline

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


SUMMARY = {  # reports/summary.json as the analysis writes it (validation protocol), three methods
    "selection": "val",
    "methods": {
        "teacher": {"seeds": 3, "teacher_top1_best": 98.123, "teacher_top1_last": 98.2},
        "vanilla": {"seeds": 3, "student_top1_best": 96.5, "student_top1_last": 96.61, "student_ece_pct_best": 2.5,
                    "student_ece_pct_ts": 1.1},
        "kd": {"seeds": 3, "student_top1_best": 97.256, "student_top1_last": 97.1, "student_ece_pct_best": 2.004,
               "student_ece_pct_ts": 1.0, "student_top1_best_vs_vanilla": 0.756},
    },
}


def test_headline_keeps_four_numbers_per_method_and_one_ece() -> None:
    numbers = headline(SUMMARY)
    assert list(numbers) == ["teacher", "vanilla", "kd"]
    assert numbers["kd"] == {"top1_last": 97.1, "top1_best": 97.26, "ece_best": 2.0, "vs_vanilla": 0.76}
    assert numbers["teacher"] == {"top1_last": 98.2, "top1_best": 98.12}  # the teacher method's own network
    assert "vs_vanilla" not in numbers["vanilla"]
    papers = {"selection": "test", "methods": {"kd": {"student_top1_best_test_selected": 97.0, "student_top1_last": 96.9,
                                                      "student_ece_pct_best_test_selected": 2.1}}}
    assert set(headline(papers)["kd"]) == {"top1_last", "top1_best_test_selected", "ece_best_test_selected"}


def test_the_experiments_changed_methods_come_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "summary.json").write_text(json.dumps(SUMMARY))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"methods": {"teacher": {}, "vanilla": {}, "kd": {"temperature": 2}}}))
    out = tmp_path / "metrics.json"
    monkeypatch.setattr(headline_module, "baseline_methods", lambda path: None)  # outside `dvc exp run`
    write_headline(tmp_path / "summary.json", tmp_path / "params.yaml", out)
    assert list(json.loads(out.read_text())) == ["teacher", "vanilla", "kd"]
    baseline = {"teacher": {}, "vanilla": {}, "kd": {"temperature": 4.0}}
    monkeypatch.setattr(headline_module, "baseline_methods", lambda path: baseline)
    numbers = write_headline(tmp_path / "summary.json", tmp_path / "params.yaml", out)
    assert list(json.loads(out.read_text())) == ["kd", "teacher", "vanilla"] == list(numbers)
    assert json.loads(out.read_text())["kd"] == headline(SUMMARY)["kd"]  # the order moves, never a number
    assert changed_methods({"kd": {"temperature": 4.0}, "dkd": {}}, {"kd": {"temperature": 4.0}}) == ["dkd"]


@pytest.mark.slow
def test_the_baseline_is_read_from_the_commit_dvc_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside `dvc exp run`, DVC_EXP_BASELINE_REV names the commit the experiment started from."""
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump({"methods": {"kd": {"temperature": 4.0}}}))
    for command in (["git", "init", "-q"], ["git", "add", "params.yaml"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"]):
        subprocess.run(command, check=True)
    revision = subprocess.run(["git", "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    assert headline_module.baseline_methods(Path("params.yaml")) is None
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", revision)
    assert headline_module.baseline_methods(Path("params.yaml")) == {"kd": {"temperature": 4.0}}


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
    for command in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"]):
        _run(command, root, env)
    _dvc(root, env, "repro")
    return root, env


@pytest.mark.slow
def test_dvc_repro_trains_sweeps_and_reports_every_method_including_a_new_file(project) -> None:
    from reproduce.methods.base import registered

    root, env = project
    names = [cls.name for cls in registered()] + ["zz_throwaway"]
    # The sync gave the new method its coefficients in params.yaml.
    assert yaml.safe_load((root / "params.yaml").read_text())["methods"]["zz_throwaway"] == {"temperature": 3.0}
    for name in names:
        summary = json.loads((root / "runs" / name / "seed0" / "metrics.json").read_text())
        assert summary["epochs"] == 1 and summary["last"]["test"][summary["primary"]]["top1"] > 10
        assert (root / "dvclive" / name / "metrics.json").exists(), name
    swept = [cls.name for cls in registered() if cls.search_space] + ["zz_throwaway"]
    for name in swept:
        assert (root / "sweep-results" / name / "best_params.yaml").exists(), name
    assert "Throw-away KD" in (root / "reports" / "index.html").read_text()
    shown = json.loads(_dvc(root, env, "metrics", "show", "--json"))
    files = {path: result["data"] for rev in shown.values() for path, result in rev["data"].items()}
    assert list(files) == ["dvclive/metrics.json"]  # the one declared metrics file: no second ECE anywhere
    assert set(files["dvclive/metrics.json"]) == set(names)
    for name, numbers in files["dvclive/metrics.json"].items():
        assert len([key for key in numbers if key.startswith("ece")]) == (0 if name == "teacher" else 1), name
    # One line of four numbers per method (it was 3,317 characters for 11 methods, with two ECEs each).
    assert max(len(line) for line in _dvc(root, env, "metrics", "show").splitlines()) < 80 * len(names)
    assert (root / "mlflow.db").exists()
    assert len(list((root / "wandb").glob("offline-run-*"))) >= len(names)


@pytest.mark.slow
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


def _cell(header: str, row: str, column: str) -> str:
    """The text under ``column`` in one line of `dvc exp show` (numbers are right-aligned to the header's end)."""
    start = header.index(f" {column} ") + 1
    return row[start - 2:start + len(column)].strip()


@pytest.mark.slow
def test_dvc_exp_show_and_diff_compare_what_the_experiment_changed(project) -> None:
    """DVC 3 lays `dvc exp show` out as every metric, then every parameter, then every stage dependency (a
    32-character hash each), so the whole table of any pipeline with code dependencies is wider than a
    terminal; on a terminal DVC pages it with `less -S`, which shows the first COLUMNS characters of each
    line. Those first 120 characters must compare the experiment's headline numbers for both rows."""
    root, env = project
    _run(["git", "add", "-A"], root, env)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "after repro"], root, env)
    # The README's example; -S rewrites params.yaml, so the unquoted `off` it writes back must still be accepted.
    _dvc(root, env, "exp", "run", "-n", "kd-t2", "-S", "methods.kd.temperature=2", "-S", "runtime.compile=off")
    # `dvc exp run` leaves the experiment's results in the workspace.
    headline_of = {"main": json.loads(_run(["git", "show", "main:dvclive/metrics.json"], root, env)),
                   "kd-t2": json.loads((root / "dvclive" / "metrics.json").read_text())}
    assert headline_of["main"]["kd"] != headline_of["kd-t2"]["kd"]

    shown = _dvc(root, {**env, "COLUMNS": "120"}, "exp", "show")  # no flags; not a terminal: the whole table
    lines = [line for line in shown.splitlines() if line.strip() and not set(line.strip()) <= {"─"}]
    header, rows = lines[0], {name: next(line for line in lines if name in line[:40]) for name in ("main", "[kd-t2]")}
    columns = ["kd.top1_last", "kd.top1_best", "kd.ece_best", "kd.vs_vanilla"]
    assert header.split()[:2] == ["Experiment", "Created"] and header.split()[2:6] == columns
    assert header.index(columns[-1]) + len(columns[-1]) <= 120
    for name, key in (("main", "main"), ("kd-t2", "[kd-t2]")):
        for column in columns:
            assert float(_cell(header, rows[key], column)) == headline_of[name]["kd"][column.split(".")[1]], (name, column)

    diff = json.loads(_dvc(root, env, "exp", "diff", "main", "kd-t2", "--json"))
    changed = diff["metrics"]["dvclive/metrics.json"]
    assert changed and set(changed) <= {f"kd.{key}" for key in headline_of["main"]["kd"]}  # only the changed method's
    methods = {key: value for key, value in diff["params"]["params.yaml"].items() if key.startswith("methods.")}
    assert methods == {"methods.kd.temperature": {"old": 4.0, "new": 2, "diff": -2.0}}  # not `- -> 2`

