"""Optuna sweeps end to end on digits: real studies through the real engine, with tiny budgets.

Every test runs in its own project folder (the working directory), so the default relative paths
(sweeps/studies, sweeps/results, checkpoints) land in a temporary directory.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from conftest import PROJECT, tiny_config
from reproduce.config import ConfigError, load_config
from reproduce.methods import METHODS, get_method
from sweeps.__main__ import main
from sweeps.settings import load_settings
from sweeps.study import (ERROR_ATTR, TRACEBACK_ATTR, WORKER_ATTR, create_or_load_study, load_existing_study,
                          plan_job, uses_budget)

KD_SPACE = {
    "temperature": {"type": "float", "low": 1, "high": 8},
    "ce_weight": {"type": "float", "low": 0.0, "high": 1.0},
    "kd_weight": {"type": "float", "low": 0.0, "high": 1.0},
}
DML_SPACE = {"kd_weight": {"type": "float", "low": 0.25, "high": 4, "log": True}}


def write_params(prepared_root: Path, project: Path, teacher_runs_root: Path | None = None, *, method: str = "kd",
                 space: dict | None = None, **sweep: object) -> Path:
    """A params.yaml in ``project``: the tiny digits config and a small sweep over ``method``."""
    settings = {"n_trials": 3, "epochs_per_trial": 2, "pruner": {"name": "none"},
                "spaces": {method: KD_SPACE if space is None else space}, **sweep}
    # One thread: on a shared 2-core machine torch's spinning thread pool is many times slower.
    config = tiny_config(prepared_root, project, runtime={"threads": 1}, sweep=settings,
                         teacher={"runs_root": str(teacher_runs_root or project / "no-teacher")})
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


def load_study(method: str, *overrides: str) -> optuna.Study:
    job = plan_job(load_config("params.yaml", list(overrides)), method)
    return load_existing_study(job.study_name, job.storage_url)


def load_study_name(method: str) -> str:
    return plan_job(load_config("params.yaml"), method).study_name


def read_csv(path: Path, delimiter: str = ",") -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle, delimiter=delimiter))


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_study_prunes_a_hopeless_trial_and_writes_loadable_best_params(
        project: Path, prepared_root: Path, teacher_runs_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_params(prepared_root, project, teacher_runs_root, n_trials=3, epochs_per_trial=3,
                 pruner={"name": "median", "warmup_epochs": 1, "startup_trials": 2})
    job = plan_job(load_config("params.yaml"), "kd")
    # A fixed order makes pruning deterministic: two trials that learn set the median, then a trial with
    # every loss weight at zero (it cannot learn: ~10 % top-1) must be pruned after epoch 2 of 3.
    study = create_or_load_study(job)
    for params in ({"temperature": 4.0, "ce_weight": 1.0, "kd_weight": 0.5},
                   {"temperature": 2.0, "ce_weight": 0.5, "kd_weight": 1.0},
                   {"temperature": 4.0, "ce_weight": 0.0, "kd_weight": 0.0}):
        study.enqueue_trial(params)

    assert main(["run", "--method", "kd"]) == 0

    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    pruned = trials[2]
    assert sorted(pruned.intermediate_values) == [1, 2] and pruned.user_attrs["epochs_trained"] == 2
    assert len(read_csv(project / "sweeps/results/kd/trials/2/history.tsv", "\t")) == 2  # it really stopped early
    assert all(sorted(t.intermediate_values) == [1, 2, 3] for t in trials if t.state == TrialState.COMPLETE)
    assert "trial 2 PRUNED" in capsys.readouterr().out

    results = project / "sweeps/results/kd"
    rows = read_csv(results / "trials.csv")
    assert [row["state"] for row in rows] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert float(rows[2]["params_ce_weight"]) == 0.0 and rows[2]["epochs_trained"] == "2"
    importance = json.loads((results / "importance.json").read_text())
    assert set(importance["importances"]["val_top1"]) == set(KD_SPACE)
    for plot in ("optimization_history.png", "param_importances.png"):
        assert (results / plot).read_bytes().startswith(b"\x89PNG")
    assert json.loads((results / "metrics.json").read_text())["trials"]["pruned"] == 1
    assert not (results / "trials/0/final.pt").exists() and (results / "trials/0/metrics.json").exists()
    assert not (project / "checkpoints/sweeps").exists() or not any((project / "checkpoints/sweeps").iterdir())

    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    overlay = yaml.safe_load((results / "best_params.yaml").read_text())
    assert overlay == {"methods": {"kd": best.params}}
    config = load_config("params.yaml", extra=overlay)
    params = get_method("kd").parse_params(config.methods["kd"])
    assert params.temperature == best.params["temperature"] and params.ce_weight == best.params["ce_weight"]

    # The results are a view of the storage: `report` rewrites them identically.
    written = (results / "best_params.yaml").read_text()
    (results / "best_params.yaml").unlink()
    assert main(["report", "--method", "kd", "--no-track"]) == 0
    assert (results / "best_params.yaml").read_text() == written


def test_trials_and_summary_are_tracked_runs_grouped_by_study(project: Path, prepared_root: Path) -> None:
    config_path = write_params(prepared_root, project, method="dml", space=DML_SPACE, n_trials=2, epochs_per_trial=1)
    raw = yaml.safe_load(config_path.read_text())
    raw["tracking"]["mlflow"]["enabled"] = True  # the conftest points MLflow at a temporary database
    config_path.write_text(yaml.safe_dump(raw))

    assert main(["run", "--method", "dml", "--quiet"]) == 0

    from mlflow.tracking import MlflowClient

    name = load_study("dml").study_name
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(raw["tracking"]["mlflow"]["experiment"])
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.group = '{name}'")
    assert sorted(run.info.run_name for run in runs) == sorted(["trials-0", "trials-1", f"{name}-summary"])
    trial_run = next(run for run in runs if run.info.run_name == "trials-0")
    assert "val/student/top1" in trial_run.data.metrics
    assert "methods.dml.kd_weight" in trial_run.data.params


def test_two_worker_processes_complete_exactly_the_budget(
        project: Path, prepared_root: Path, teacher_runs_root: Path) -> None:
    # An odd budget: the two workers cannot split it evenly, so one must stop at the right moment.
    write_params(prepared_root, project, teacher_runs_root, n_trials=3, epochs_per_trial=1)

    assert main(["run", "--method", "kd", "--workers", "2", "--quiet", "--no-track"]) == 0

    study = load_study("kd")
    assert (project / "sweeps/studies/kd.db").is_file()  # the default storage
    counted = [t for t in study.get_trials() if uses_budget(t)]
    assert [t.number for t in counted] == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in counted)
    assert len({tuple(sorted(t.params.items())) for t in counted}) == 3  # no duplicated parameters
    assert os.getpid() not in {t.user_attrs[WORKER_ATTR]["pid"] for t in counted}  # ran in spawned workers
    assert len(read_csv(project / "sweeps/results/kd/trials.csv")) == len(study.get_trials())


def test_rerun_resumes_keeps_earlier_trials_and_replaces_a_killed_workers_trial(
        project: Path, prepared_root: Path, teacher_runs_root: Path) -> None:
    # A journal file has no heartbeat: replacing the killed worker's trial relies on its process id.
    write_params(prepared_root, project, teacher_runs_root, n_trials=2, epochs_per_trial=2,
                 storage="journal:sweeps/studies/{method}.log")
    assert main(["run", "--method", "kd", "--quiet", "--no-track"]) == 0
    study = load_study("kd")
    first = [(t.number, t.params, t.datetime_start, t.value) for t in study.get_trials()]
    assert len(first) == 2

    # Raise the budget (same study: the budget is not part of its identity) and kill the worker mid-trial.
    command = [sys.executable, "-m", "sweeps", "run", "--method", "kd", "--set", "sweep.n_trials=4", "--no-track"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}
    worker = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(t.number == 2 and t.state == TrialState.RUNNING and WORKER_ATTR in t.user_attrs
                  for t in study.get_trials()):
        assert worker.poll() is None and time.monotonic() < deadline, "the worker never started trial 2"
        time.sleep(0.2)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()

    assert main(["run", "--method", "kd", "--set", "sweep.n_trials=4", "--quiet", "--no-track"]) == 0

    trials = study.get_trials()
    assert [(t.number, t.params, t.datetime_start, t.value) for t in trials[:2]] == first
    assert trials[2].state == TrialState.FAIL and ERROR_ATTR not in trials[2].user_attrs
    counted = [t for t in trials if uses_budget(t)]
    assert [t.number for t in counted] == [0, 1, 3, 4]
    assert all(t.state == TrialState.COMPLETE for t in counted)
    # A rerun must not replay the first run's random start-up points.
    assert len({tuple(sorted(t.params.items())) for t in trials}) == len(trials)
    rows = read_csv(project / "sweeps/results/kd/trials.csv")
    assert "interrupted" in rows[2]["error"]


def test_a_failing_trial_is_recorded_with_its_error_and_the_study_goes_on(
        project: Path, prepared_root: Path, teacher_runs_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sweeps.study

    real_train = sweeps.study.train

    def train_that_diverges_in_trial_1(config, spec, **kwargs):  # type: ignore[no-untyped-def]
        if spec.run_dir.name == "1":
            raise FloatingPointError("loss is nan at epoch 1")
        return real_train(config, spec, **kwargs)

    monkeypatch.setattr(sweeps.study, "train", train_that_diverges_in_trial_1)
    write_params(prepared_root, project, teacher_runs_root, n_trials=3, epochs_per_trial=1)

    assert main(["run", "--method", "kd", "--quiet", "--no-track"]) == 0

    trials = load_study("kd").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs[ERROR_ATTR] == "FloatingPointError: loss is nan at epoch 1"
    assert "train_that_diverges_in_trial_1" in trials[1].user_attrs[TRACEBACK_ATTR]
    rows = read_csv(project / "sweeps/results/kd/trials.csv")
    assert rows[1]["state"] == "FAIL" and rows[1]["error"] == "FloatingPointError: loss is nan at epoch 1"


def test_a_study_whose_every_trial_fails_ends_with_an_error(
        project: Path, prepared_root: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import sweeps.study

    def broken_train(config, spec, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("broken method")

    monkeypatch.setattr(sweeps.study, "train", broken_train)
    write_params(prepared_root, project, method="dml", space=DML_SPACE, n_trials=2)

    assert main(["run", "--method", "dml", "--quiet", "--no-track"]) == 1  # failed trials use the budget: it ends

    assert [t.state for t in load_study("dml").get_trials()] == [TrialState.FAIL] * 2
    assert "no trial of dml-" in capsys.readouterr().err
    assert not (project / "sweeps/results/dml/best_params.yaml").exists()


def test_multi_objective_study_gives_a_pareto_front_and_never_prunes(
        project: Path, prepared_root: Path, teacher_runs_root: Path) -> None:
    # This pruner would stop trials after epoch 1 in a single-objective study.
    write_params(prepared_root, project, teacher_runs_root, n_trials=3, epochs_per_trial=2,
                 pruner={"name": "median", "warmup_epochs": 0, "startup_trials": 0})
    # Results another study left behind (other settings) must not mix with this study's.
    stale = project / "sweeps/results/kd/trials/7"
    stale.mkdir(parents=True)
    (project / "sweeps/results/kd/study.json").write_text(json.dumps({"study": "kd-00000000"}))

    assert main(["run", "--method", "kd", "--multi-objective", "--quiet", "--no-track"]) == 0
    assert not stale.exists()

    study = load_study("kd", "sweep.multi_objective=true")
    assert study.study_name != load_study_name("kd")  # two objectives: another study
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert all(not t.intermediate_values and t.user_attrs["epochs_trained"] == 2 for t in trials)
    assert all(0 <= t.values[1] <= 1 for t in trials)  # ECE is a fraction

    results = project / "sweeps/results/kd"
    front = study.best_trials
    pareto = read_csv(results / "pareto.csv")
    assert sorted(int(row["number"]) for row in pareto) == sorted(t.number for t in front)
    most_accurate = max(front, key=lambda t: (t.values[0], -t.values[1]))
    assert yaml.safe_load((results / "best_params.yaml").read_text()) == {"methods": {"kd": most_accurate.params}}
    assert set(read_csv(results / "trials.csv")[0]) >= {"val_top1", "val_ece"}
    assert (results / "pareto_front.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("method, space, message", [
    ("kd", {"temprature": {"type": "float", "low": 1, "high": 8}},
     "sweep.spaces.kd.temprature: kd has no parameter 'temprature'; did you mean 'temperature'?"),
    ("kd", {"temperature": {"type": "float", "low": 8, "high": 1}},
     "sweep.spaces.kd.temperature: low (8.0) must be smaller than high (1.0)"),
    ("kd", {"temperature": {"type": "flaot", "low": 1, "high": 8}},
     "sweep.spaces.kd.temperature.type: 'flaot' is not one of float, int, categorical"),
    ("kd", {"temperature": {"type": "float", "low": 1, "hi": 8}},
     "unknown key 'sweep.spaces.kd.temperature.hi' (did you mean 'sweep.spaces.kd.temperature.high'?)"),
    ("kd", {"temperature": {"type": "float", "low": 0, "high": 8, "log": True}},
     "sweep.spaces.kd.temperature: log: true needs low > 0"),
    ("kd", {"temperature": {"type": "categorical", "choices": [4, "hot"]}},
     "sweep.spaces.kd.temperature: kd rejects temperature='hot'"),
    ("dml", {"extra_students": {"type": "int", "low": -1, "high": 2}},
     "sweep.spaces.dml.extra_students: dml rejects extra_students=-1"),
    ("dml", {"extra_students": {"type": "int", "low": 0, "high": 2.5}},
     "sweep.spaces.dml.extra_students.high: a type: int range needs whole numbers"),
])
def test_a_bad_search_space_is_a_clear_error_before_any_trial(
        project: Path, prepared_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        method: str, space: dict, message: str) -> None:
    import sweeps.study

    monkeypatch.setattr(sweeps.study, "train", lambda *args, **kwargs: pytest.fail("a trial ran"))
    write_params(prepared_root, project, method=method, space=space)

    assert main(["run", "--method", method]) == 2

    assert message in capsys.readouterr().err
    assert not (project / "sweeps").exists()  # no study, no results


@pytest.mark.parametrize("sweep, message", [
    ({"pruner": {"name": "median", "warmup_epochs": -1}}, "sweep.pruner.warmup_epochs: must be >= 0"),
    ({"pruner": {"name": "successive"}}, "sweep.pruner.name: 'successive' is not one of median, hyperband, none"),
    ({"storage": "studies/kd.db"}, "sweep.storage: 'studies/kd.db' is neither a database URL"),
    ({"n_trails": 4}, "unknown key 'sweep.n_trails' (did you mean 'sweep.n_trials'?)"),
    ({"methods": ["vanilla"], "spaces": {"vanilla": {}}},
     "sweep.methods lists 'vanilla' but sweep.spaces.vanilla is empty"),
])
def test_bad_sweep_settings_are_clear_errors(project: Path, prepared_root: Path, capsys: pytest.CaptureFixture[str],
                                             sweep: dict, message: str) -> None:
    write_params(prepared_root, project, teacher_runs_root=None, **sweep)
    assert main(["run", "--method", "kd"]) == 2
    assert message in capsys.readouterr().err


def test_a_method_with_an_empty_space_gets_no_study(project: Path, prepared_root: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    write_params(prepared_root, project, method="vanilla", space={})
    assert main(["run", "--method", "vanilla"]) == 0
    assert "nothing to tune; no study created" in capsys.readouterr().out
    assert not (project / "sweeps").exists()


def test_study_name_changes_with_what_makes_trials_comparable_only(prepared_root: Path, tmp_path: Path) -> None:
    def name(method_params: dict | None = None, models: dict | None = None, **sweep: object) -> str:
        settings = {"epochs_per_trial": 3, "spaces": {"kd": KD_SPACE}, **sweep}
        config = tiny_config(prepared_root, tmp_path, sweep=settings, methods={"kd": method_params or {}},
                             **({"models": models} if models else {}))
        return plan_job(config, "kd").study_name

    base = name()
    assert base.startswith("kd-")
    # The budget, the pruner and the workers may change while a study runs.
    assert name(n_trials=50, workers=4, pruner={"name": "hyperband"}, storage="journal:x.log") == base
    assert name(epochs_per_trial=5) != base
    assert name(spaces={"kd": {**KD_SPACE, "temperature": {"type": "float", "low": 1, "high": 4}}}) != base
    assert name(models={"teacher": "resnet8", "student": "resnet8x4"}) != base
    assert name(multi_objective=True) != base
    assert name(method_params={"temperature": 2.0}) == base  # searched: its configured value does not matter
    assert name(spaces={"kd": {"temperature": KD_SPACE["temperature"]}}, method_params={"ce_weight": 0.5}) != \
        name(spaces={"kd": {"temperature": KD_SPACE["temperature"]}})  # held fixed: it does


def test_shipped_params_and_dvc_stage_are_consistent() -> None:
    config = load_config(PROJECT / "params.yaml")
    settings = load_settings(config)
    for method in METHODS:  # every shipped space is valid against its method now
        plan_job(config, method)
    assert settings.methods and all(plan_job(config, method) is not None for method in settings.methods)
    stage = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]["sweep"]
    assert stage["matrix"] == {"method": "${sweep.methods}"}
    assert stage["cmd"] == "python -m sweeps run --method ${item.method}"
    assert stage["outs"] == ["sweeps/results/${item.method}"]
    assert {"sweep", "methods.${item.method}"} <= set(stage["params"])
    for dep in stage["deps"]:
        if "$" not in dep and not dep.startswith(("data/", "runs/")):
            assert (PROJECT / dep).exists(), dep


def test_help_documents_run_and_report(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "run" in text and "report" in text and "optuna-dashboard" in text
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "--workers" in capsys.readouterr().out


def test_pruning_is_off_where_it_could_never_act(prepared_root: Path, tmp_path: Path) -> None:
    def pruner(**sweep: object) -> optuna.pruners.BasePruner:
        return load_settings(tiny_config(prepared_root, tmp_path, sweep=sweep)).make_pruner()

    median = {"name": "median", "warmup_epochs": 1}
    assert isinstance(pruner(epochs_per_trial=3, pruner=median), optuna.pruners.MedianPruner)
    # The first check would follow epoch 2, but epoch 2 is the last: the trial is done by then.
    assert isinstance(pruner(epochs_per_trial=2, pruner=median), optuna.pruners.NopPruner)
    assert isinstance(pruner(epochs_per_trial=3, pruner=median, multi_objective=True), optuna.pruners.NopPruner)
    assert isinstance(pruner(epochs_per_trial=5, pruner={"name": "hyperband"}), optuna.pruners.HyperbandPruner)


def test_settings_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"sweep\.n_trials: must be at least 1"):
        load_settings(load_config(PROJECT / "params.yaml", ["sweep.n_trials=0"]))
