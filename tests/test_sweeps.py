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
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from conftest import PROJECT, tiny_config
from reproduce.config import ConfigError, load_config
from reproduce.methods import METHODS, get_method
from reproduce.methods.base import registered
from sweeps.__main__ import main
from sweeps.settings import load_settings
from sweeps.study import (ERROR_ATTR, RETRIED_ATTR, TRACEBACK_ATTR, WORKER_ATTR, create_or_load_study,
                          load_existing_study, plan_job, uses_budget)

KD_SPACE = {
    "temperature": {"type": "float", "low": 1, "high": 8},
    "ce_weight": {"type": "float", "low": 0.0, "high": 1.0},
    "kd_weight": {"type": "float", "low": 0.0, "high": 1.0},
}
DML_SPACE = {"kd_weight": {"type": "float", "low": 0.25, "high": 4, "log": True}}


def write_params(prepared_root: Path, project: Path, teacher_runs_root: Path | None = None, *, method: str = "kd",
                 space: dict | None = None, dataset: dict | None = None, **sweep: object) -> Path:
    """A params.yaml in ``project``: the tiny digits config and a small sweep over ``method``
    (``space``: sweep.spaces.<method>, KD_SPACE by default)."""
    settings = {"n_trials": 3, "epochs_per_trial": 2, "pruner": {"name": "none"},
                "spaces": {method: KD_SPACE if space is None else space}, **sweep}
    # One thread: on a shared 2-core machine torch's spinning thread pool is many times slower.
    config = tiny_config(prepared_root, project, runtime={"threads": 1}, sweep=settings,
                         teacher={"runs_root": str(teacher_runs_root or project / "no-teacher")},
                         **({"dataset": dataset} if dataset else {}))
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
    config_path = write_params(prepared_root, project, teacher_runs_root, n_trials=3, epochs_per_trial=3,
                               pruner={"name": "median", "warmup_epochs": 1, "startup_trials": 2})
    raw = yaml.safe_load(config_path.read_text())
    raw["tracking"]["mlflow"]["enabled"] = True  # the conftest points MLflow at a temporary database
    config_path.write_text(yaml.safe_dump(raw))
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

    # MLflow: one run for the study (named after it, finished), every trial's run nested under it, and
    # the pruned trial not recorded as a failure.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(raw["tracking"]["mlflow"]["experiment"])
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.group = '{study.study_name}'")
    parents = [run for run in runs if run.info.run_name == study.study_name]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {run.info.run_name: run for run in runs if run.info.run_name != study.study_name}
    assert sorted(children) == ["trials-0", "trials-1", "trials-2"]
    assert all(run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id for run in children.values())
    assert "val/student/top1" in children["trials-0"].data.metrics
    assert "methods.kd.temperature" in children["trials-0"].data.params
    assert children["trials-0"].info.status == "FINISHED" and children["trials-2"].info.status != "FAILED"
    assert children["trials-2"].data.tags.get("outcome") == "pruned"

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


def test_two_worker_processes_keep_the_budget_exact_when_one_is_killed_mid_trial(
        project: Path, prepared_root: Path, teacher_runs_root: Path) -> None:
    # An odd budget: the two workers cannot split it evenly, so one must stop at the right moment.
    config_path = write_params(prepared_root, project, teacher_runs_root, n_trials=3, epochs_per_trial=2)
    raw = yaml.safe_load(config_path.read_text())
    raw["tracking"]["mlflow"]["enabled"] = True
    config_path.write_text(yaml.safe_dump(raw))
    study = create_or_load_study(plan_job(load_config("params.yaml"), "kd"))
    killed: list[int] = []

    def kill_the_first_worker_mid_trial() -> None:
        deadline = time.monotonic() + 180
        while not killed and time.monotonic() < deadline:
            for trial in study.get_trials():
                if (trial.state == TrialState.RUNNING and WORKER_ATTR in trial.user_attrs
                        and len(trial.params) == len(KD_SPACE)):
                    os.kill(trial.user_attrs[WORKER_ATTR]["pid"], signal.SIGKILL)
                    killed.append(trial.number)
                    return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_the_first_worker_mid_trial)
    killer.start()
    assert main(["run", "--method", "kd", "--workers", "2", "--quiet"]) == 0  # what the dead worker left is finished
    killer.join()

    assert (project / "sweeps/studies/kd.db").is_file()  # the default storage
    assert killed, "no worker was killed"
    trials = study.get_trials()
    dead = trials[killed[0]]
    assert dead.state == TrialState.FAIL and not uses_budget(dead)
    [retry] = [t for t in trials if t.system_attrs.get(RETRIED_ATTR) == dead.number]
    assert retry.params == dead.params and retry.state == TrialState.COMPLETE
    counted = [t for t in trials if uses_budget(t)]
    assert len(counted) == 3 and all(t.state == TrialState.COMPLETE for t in counted)
    assert len({tuple(sorted(t.params.items())) for t in counted}) == 3  # no duplicated parameters
    assert os.getpid() not in {dead.user_attrs[WORKER_ATTR]["pid"], counted[0].user_attrs[WORKER_ATTR]["pid"]}
    assert len(read_csv(project / "sweeps/results/kd/trials.csv")) == len(trials)
    # Every trial's run nests under the study run this process opened and finished (the spawned
    # workers reopen it by its key). The killed trial has one only if it got that far.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(raw["tracking"]["mlflow"]["experiment"])
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.group = '{study.study_name}'")
    [parent] = [run for run in runs if run.info.run_name == study.study_name]
    assert parent.info.status == "FINISHED"
    names = {run.info.run_name for run in runs if run is not parent}
    assert {f"trials-{t.number}" for t in counted} <= names <= {f"trials-{t.number}" for t in trials}
    assert {run.data.tags.get("mlflow.parentRunId") for run in runs if run is not parent} == {parent.info.run_id}


def test_rerun_resumes_keeps_earlier_trials_and_retries_a_killed_workers_trial(
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
                  and len(t.params) == len(KD_SPACE) for t in study.get_trials()):
        assert worker.poll() is None and time.monotonic() < deadline, "the worker never started trial 2"
        time.sleep(0.1)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()

    assert main(["run", "--method", "kd", "--set", "sweep.n_trials=4", "--quiet", "--no-track"]) == 0

    trials = study.get_trials()
    assert [(t.number, t.params, t.datetime_start, t.value) for t in trials[:2]] == first
    killed = trials[2]
    assert killed.state == TrialState.FAIL and ERROR_ATTR not in killed.user_attrs
    # Optuna's retry callback queued the killed trial's parameters again, as the next trial.
    retry = trials[3]
    assert retry.system_attrs[RETRIED_ATTR] == 2 and retry.params == killed.params
    assert retry.user_attrs[WORKER_ATTR]["pid"] == os.getpid()  # rerun here, not a copy of the dead worker's marks
    counted = [t for t in trials if uses_budget(t)]
    assert [t.number for t in counted] == [0, 1, 3, 4]
    assert all(t.state == TrialState.COMPLETE for t in counted)
    # A rerun must not replay the first run's random start-up points.
    assert len({tuple(sorted(t.params.items())) for t in counted}) == len(counted)
    rows = read_csv(project / "sweeps/results/kd/trials.csv")
    assert "interrupted" in rows[2]["error"] and rows[3]["retry_of"] == "2"


def test_a_diverging_trial_is_failed_with_the_engines_message_and_the_study_goes_on(
        project: Path, prepared_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from reproduce.methods.dml import DML

    real_step = DML.step

    def step_that_diverges_at_kd_weight_3(self, x, y, epoch):  # type: ignore[no-untyped-def]
        step = real_step(self, x, y, epoch)
        if self.params.kd_weight == 3.0:
            step.losses["student"]["kd"] = step.losses["student"]["kd"] * float("nan")
        return step

    monkeypatch.setattr(DML, "step", step_that_diverges_at_kd_weight_3)
    write_params(prepared_root, project, method="dml", space=DML_SPACE, n_trials=3, epochs_per_trial=1)
    study = create_or_load_study(plan_job(load_config("params.yaml"), "dml"))
    for kd_weight in (1.0, 3.0, 0.5):
        study.enqueue_trial({"kd_weight": kd_weight})

    assert main(["run", "--method", "dml", "--quiet", "--no-track"]) == 0  # one trial completed: a best exists

    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    error = trials[1].user_attrs[ERROR_ATTR]
    assert error.startswith("DivergedError: training diverged at epoch 1")
    assert "method dml, role student, loss term 'kd' is nan" in error
    assert "train_step" in trials[1].user_attrs[TRACEBACK_ATTR]
    assert uses_budget(trials[1])  # a verdict on its parameters: counted, not retried
    rows = read_csv(project / "sweeps/results/dml/trials.csv")
    assert rows[1]["state"] == "FAIL" and rows[1]["error"] == error


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


def test_method_all_runs_every_listed_study_in_one_process(
        project: Path, prepared_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sweeps.study

    processes = set()
    real_train = sweeps.study.train

    def train_here(config, spec, **kwargs):  # type: ignore[no-untyped-def]
        processes.add(os.getpid())
        return real_train(config, spec, **kwargs)

    monkeypatch.setattr(sweeps.study, "train", train_here)
    # dml searches the override below, switokd its own registered space.
    write_params(prepared_root, project, method="dml", space=DML_SPACE, n_trials=1, epochs_per_trial=1,
                 methods=["switokd", "dml"])

    assert main(["run", "--method", "all", "--quiet", "--no-track"]) == 0

    assert processes == {os.getpid()}
    for method in ("switokd", "dml"):
        marker = json.loads((project / f"sweeps/results/{method}/study.json").read_text())
        [trial] = load_existing_study(marker["study"], f"sqlite:///sweeps/studies/{method}.db").get_trials()
        assert trial.state == TrialState.COMPLETE
        expected = DML_SPACE if method == "dml" else get_method(method).search_space
        assert set(trial.params) == set(expected)
    # A comma list runs those, in that order; a finished study only reports.
    assert main(["run", "--method", "dml,switokd", "--quiet", "--no-track"]) == 0


def test_search_spaces_come_from_the_registry_and_params_yaml_replaces_one(prepared_root: Path,
                                                                           tmp_path: Path) -> None:
    config = tiny_config(prepared_root, tmp_path, sweep={"spaces": {"dml": DML_SPACE, "kd": {}}})
    settings = load_settings(config)
    swept = [cls.name for cls in registered() if getattr(cls, "search_space", {})]
    assert swept, "no registered method declares a search space"
    # The default list: every registered method with a space, in table order, less the emptied kd.
    assert settings.swept_methods() == [name for name in swept if name != "kd"]
    assert set(plan_job(config, "dml").space) == set(DML_SPACE)  # replaced, not merged
    assert plan_job(config, "kd") is None  # emptied by the override: not swept
    other = next(name for name in swept if name not in ("dml", "kd"))
    assert set(plan_job(config, other).space) == set(get_method(other).search_space)
    assert settings.select_methods("all") == settings.swept_methods()
    assert settings.select_methods(" dml, kd ,dml") == ["dml", "kd"]
    with pytest.raises(ConfigError, match="unknown method 'kdd'"):
        settings.select_methods("dml,kdd")


def test_a_sweep_without_a_validation_split_is_a_clear_error_before_any_trial(
        project: Path, prepared_root: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import sweeps.study

    monkeypatch.setattr(sweeps.study, "train", lambda *args, **kwargs: pytest.fail("a trial ran"))
    write_params(prepared_root, project, method="dml", space=DML_SPACE, dataset={"val_fraction": 0})

    assert main(["run", "--method", "dml", "--no-track"]) == 2

    err = capsys.readouterr().err
    assert "a sweep scores every trial on the validation split, and dataset.val_fraction is 0" in err
    assert "Set dataset.val_fraction > 0" in err
    assert not (project / "sweeps/studies").exists()  # no study created


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


def test_a_bad_registered_search_space_names_the_method_class(
        project: Path, prepared_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from reproduce.methods.dml import DML

    monkeypatch.setattr(DML, "search_space", {"kd_wieght": {"type": "float", "low": 0.5, "high": 2}})
    with pytest.raises(ConfigError, match=r"reproduce\.methods\.dml\.DML\.search_space\.kd_wieght: dml has no "
                                          r"parameter 'kd_wieght'; did you mean 'kd_weight'\?"):
        plan_job(tiny_config(prepared_root, project), "dml")


@pytest.mark.parametrize("sweep, message", [
    ({"pruner": {"name": "median", "warmup_epochs": -1}}, "sweep.pruner.warmup_epochs: must be >= 0"),
    ({"pruner": {"name": "successive"}}, "sweep.pruner.name: 'successive' is not one of median, hyperband, none"),
    ({"storage": "studies/kd.db"}, "sweep.storage: 'studies/kd.db' is neither a database URL"),
    ({"n_trails": 4}, "unknown key 'sweep.n_trails' (did you mean 'sweep.n_trials'?)"),
    ({"methods": ["vanilla"], "spaces": {"vanilla": {}}},
     "sweep.methods lists 'vanilla' but its search space is empty"),
    ({"spaces": {"kdd": {}}}, "unknown method 'kdd'"),
    ({"heartbeat": {"interval_s": 60, "grace_s": 30}}, "sweep.heartbeat: need interval_s >= 1 and grace_s > interval_s"),
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
    assert "its search space is empty, so there is nothing to tune; no study created" in capsys.readouterr().out
    assert not (project / "sweeps").exists()


def test_study_name_changes_with_what_makes_trials_comparable_only(prepared_root: Path, tmp_path: Path) -> None:
    def name(method_params: dict | None = None, models: dict | None = None, **sweep: object) -> str:
        settings = {"epochs_per_trial": 3, "spaces": {"kd": KD_SPACE}, **sweep}
        config = tiny_config(prepared_root, tmp_path, sweep=settings, methods={"kd": method_params or {}},
                             **({"models": models} if models else {}))
        return plan_job(config, "kd").study_name

    base = name()
    assert base.startswith("kd-")
    # The budget, the pruner, the workers and the heartbeat may change while a study runs.
    assert name(n_trials=50, workers=4, pruner={"name": "hyperband"}, storage="journal:x.log",
                heartbeat={"interval_s": 5, "grace_s": 20}) == base
    assert name(epochs_per_trial=5) != base
    assert name(spaces={"kd": {**KD_SPACE, "temperature": {"type": "float", "low": 1, "high": 4}}}) != base
    assert name(models={"teacher": "resnet8", "student": "resnet8x4"}) != base
    assert name(multi_objective=True) != base
    assert name(method_params={"temperature": 2.0}) == base  # searched: its configured value does not matter
    assert name(spaces={"kd": {"temperature": KD_SPACE["temperature"]}}, method_params={"ce_weight": 0.5}) != \
        name(spaces={"kd": {"temperature": KD_SPACE["temperature"]}})  # held fixed: it does


def test_shipped_params_give_a_valid_study_to_every_method_with_a_space() -> None:
    config = load_config(PROJECT / "params.yaml")
    settings = load_settings(config)
    for method in METHODS.names():  # every shipped space is valid against its method now
        plan_job(config, method)
    assert settings.swept_methods() and all(plan_job(config, method) is not None for method in settings.swept_methods())
    registry = PROJECT / "registry.yaml"  # what dvc.yaml iterates over, generated from the registry
    if registry.is_file() and not settings.spaces:
        assert settings.swept_methods() == yaml.safe_load(registry.read_text())["registry"]["sweep"]


def test_help_documents_run_and_report(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "run" in text and "report" in text and "optuna-dashboard" in text and "--method all" in text
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


def test_trial_seeded_sampler_is_reproducible_whatever_the_worker() -> None:
    from sweeps.study import TrialSeededTPESampler

    def draws(worker_seed: int, study_seed: int = 0) -> list[tuple]:
        study = optuna.create_study(sampler=TrialSeededTPESampler(study_seed, worker_seed))
        # Past the 10 random start-up trials: TPE's own draws are seeded per trial too.
        study.optimize(lambda t: t.suggest_float("x", 0, 1) + len(t.suggest_categorical("c", ["a", "bb"])),
                       n_trials=13)
        return [tuple(sorted(t.params.items())) for t in study.trials]

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    first = draws(worker_seed=1)
    assert draws(worker_seed=2) == first  # another process, another machine: the same trial gets the same draw
    assert len(set(first)) == len(first)  # different trials, different draws
    assert draws(worker_seed=1, study_seed=1) != first


def test_a_worker_is_dead_when_its_process_is_gone_or_its_id_was_recycled() -> None:
    from sweeps.study import _worker_is_dead, this_worker

    here = this_worker()
    assert here["started"] is not None  # Linux: /proc gives each process its start time
    assert not _worker_is_dead(here, here)
    assert _worker_is_dead({**here, "started": "0"}, here)  # same id, a process that started at another time
    assert _worker_is_dead({**here, "boot": "an earlier boot"}, here)
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert _worker_is_dead({**here, "pid": process.pid, "started": None}, here)
    assert not _worker_is_dead({**here, "host": "another-machine", "pid": process.pid}, here)  # the heartbeat's job
