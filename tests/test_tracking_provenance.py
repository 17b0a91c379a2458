"""What a tracked run says about itself: the MLflow experiment opens on its runs table, a run records
its method's effective coefficients, its DVC experiment, config fingerprint, source, user, job type and
group; the dirty flag ignores what the pipeline writes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from reproduce.config import config_from_dict
from reproduce.tracking import fingerprint, git_commit, training_params
from test_tracking import _mlflow_runs, _tracker, _tracking, _wandb_runs, isolated, mlflow_store  # noqa: F401


def test_training_params_hold_the_methods_effective_coefficients() -> None:
    config = config_from_dict({"methods": {"kd": {"temperature": 2.0}}})
    params = training_params(config, "kd", {"method": "kd", "seed": "0"})
    # params.yaml overrode the temperature; the weights are KD's own defaults, logged all the same.
    assert params["method_params"] == {"temperature": 2.0, "ce_weight": 0.1, "kd_weight": 0.9}
    assert params["methods"] == {"kd": {"temperature": 2.0}} and params["run"]["seed"] == "0"
    assert set(params["run"]) >= {"commit", "dirty"}


def test_a_fingerprint_names_a_configuration() -> None:
    assert fingerprint({"a": 1, "b": [2, 3]}) == fingerprint({"b": [2, 3], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2}) and len(fingerprint({})) == 12


def test_a_training_run_is_grouped_by_experiment_and_method_and_says_where_it_came_from(
        isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "warm-koan")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    config = _tracking(isolated)
    train = _tracker(config, isolated, name="kd-seed0")
    analysis = _tracker(config, isolated, name="analysis", job_type="analysis")
    for tracker in (train, analysis):
        tracker.finish({})
    runs = _mlflow_runs(isolated)
    tags = runs["kd-seed0"].data.tags
    assert (tags["group"], tags["job_type"], tags["dvc.exp_name"], tags["dvc.baseline_rev"]) == (
        "warm-koan-kd", "train", "warm-koan", "abc123")
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"] and tags["mlflow.user"]
    assert (runs["analysis"].data.tags["group"], runs["analysis"].data.tags["job_type"]) == ("warm-koan", "analysis")
    (logged,) = _wandb_runs(isolated, train.key)
    assert (logged["group"], logged["job_type"]) == ("warm-koan-kd", "train")
    with pytest.raises(ValueError, match="job_type"):
        _tracker(config, isolated, job_type="pipeline", enabled=False)


def test_the_mlflow_experiment_opens_on_its_runs_table(isolated: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{isolated / 'mlflow.db'}")
    mine = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    older = client.create_experiment("older")  # made before the tag existed
    for name in ("tests", "chosen", "older"):
        config = config_from_dict({"tracking": {"wandb": {"enabled": False}, "mlflow": {
            "tracking_uri": f"sqlite:///{isolated / 'mlflow.db'}", "experiment": name}}}).tracking
        _tracker(config, isolated).finish({})
    kinds = {name: client.get_experiment_by_name(name).tags.get("mlflow.experimentKind") for name in ("tests", "chosen", "older")}
    assert kinds == {"tests": "custom_model_development", "chosen": "genai_development",
                     "older": "custom_model_development"}
    assert {mine, older} <= {e.experiment_id for e in client.search_experiments()}


@pytest.mark.slow
def test_the_dirty_flag_ignores_what_the_pipeline_writes(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    files = {"dvc.yaml": "stages:\n  train:\n    foreach: [kd]\n    do:\n      cmd: x\n      outs:\n"
                         "        - runs/${item}\n      metrics:\n        - dvclive/${item}/metrics.json:\n"
                         "            cache: false\n  analysis:\n    cmd: y\n    outs:\n      - reports/index.html\n",
             ".gitignore": "/local-notes/\n", "dvc.lock": "a\n", "params.yaml": "seed: 0\n", "registry.yaml": "m: []\n",
             "dvclive/kd/metrics.json": "{}\n", "reports/index.html": "<p>\n", "local-notes/n.txt": "x\n",
             "runs/kd/seed0/metrics.json": "{}\n", "code.py": "x = 1\n"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    git("init", "-q")
    git("add", "-f", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "fresh clone")
    assert git_commit(tmp_path)["dirty"] is False
    for name in files:  # everything a `dvc repro` or `dvc exp run -S` rewrites
        if name not in ("code.py", "dvc.yaml", ".gitignore"):
            (tmp_path / name).write_text("changed\n")
    assert git_commit(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path)["dirty"] is True
