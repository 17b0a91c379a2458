"""Optuna sweeps end to end on digits: real studies through the real engine, with tiny budgets (slow:
real training, worker processes). The fast checks of the same package are in test_sweeps_units.py.

Every test runs in its own project folder (the working directory), so the default relative paths
(studies/, sweep-results/, checkpoints/) land in a temporary directory.
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
from reproduce.config import deep_merge, load_config
from reproduce.methods import get_method
from sweeps.__main__ import main
from sweeps.budget import ERROR_ATTR, TRACEBACK_ATTR, WORKER_ATTR, retried_from, uses_budget
from sweeps.plan import plan_job
from sweeps.storage import load_existing_study
from sweeps.study import create_or_load_study

KD_SPACE = {
    "temperature": {"type": "float", "low": 1, "high": 8},
    "ce_weight": {"type": "float", "low": 0.0, "high": 1.0},
    "kd_weight": {"type": "float", "low": 0.0, "high": 1.0},
}
DML_SPACE = {"kd_weight": {"type": "float", "low": 0.25, "high": 4, "log": True}}


def write_params(prepared_root: Path, project: Path, teacher_runs_root: Path | None = None, *, method: str = "kd",
                 space: dict | None = None, dataset: dict | None = None, method_params: dict | None = None,
                 runtime: dict | None = None, **sweep: object) -> Path:
    """A params.yaml in ``project``: the tiny digits config and a small sweep over ``method``
    (``space``: sweep.spaces.<method>, KD_SPACE by default; ``method_params``: the ``methods`` section).
    The sweep settings and method coefficients are written as given, unchecked: the command under test
    is what must refuse bad ones."""
    config = tiny_config(prepared_root, project, runtime={"threads": 1, **(runtime or {})},
                         teacher={"runs_root": str(teacher_runs_root or project / "no-teacher")},
                         **({"dataset": dataset} if dataset else {}))
    settings = {"n_trials": 3, "epochs_per_trial": 2, "pruner": {"name": "none"},
                "spaces": {method: KD_SPACE if space is None else space}, **sweep}
    # One thread: on a shared 2-core machine torch's spinning thread pool is many times slower.
    raw = deep_merge(config.to_dict(), {"sweep": settings, "methods": method_params or {}})
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def enable_mlflow(config_path: Path) -> dict:
    raw = yaml.safe_load(config_path.read_text())
    raw["tracking"]["mlflow"]["enabled"] = True  # the conftest points MLflow at a temporary database
    config_path.write_text(yaml.safe_dump(raw))
    return raw


def load_study(method: str, *overrides: str) -> optuna.Study:
    job = plan_job(load_config("params.yaml", list(overrides)), method)
    return load_existing_study(job.study_name, job.storage_url)


def load_study_name(method: str, *overrides: str) -> str:
    return plan_job(load_config("params.yaml", list(overrides)), method).study_name


def read_csv(path: Path, delimiter: str = ",") -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle, delimiter=delimiter))


def mlflow_runs(raw: dict, group: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(raw["tracking"]["mlflow"]["experiment"])
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.group = '{group}'")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_study_prunes_a_hopeless_trial_and_writes_loadable_best_params(
        project: Path, prepared_root: Path, teacher_runs_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_path = write_params(prepared_root, project, teacher_runs_root, n_trials=3, epochs_per_trial=3,
                               pruner={"name": "median", "warmup_epochs": 1, "startup_trials": 2})
    raw = enable_mlflow(config_path)
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
    results = project / "sweep-results/kd"
    trial_dirs = results / "trials" / study.study_name
    assert len(read_csv(trial_dirs / "2/history.tsv", "\t")) == 2  # it really stopped early
    assert all(sorted(t.intermediate_values) == [1, 2, 3] for t in trials if t.state == TrialState.COMPLETE)
    out = capsys.readouterr().out
    assert "trial 2 PRUNED" in out
    # The budget is printed at the start and with the outcome, and a 2-complete-trial best is a smoke test.
    assert out.count("budget 3 trials x 3 of the run's 2 epochs, median pruning from epoch 2") == 2
    assert "a smoke test (2 complete trials, fewer than 10): not a tuning result" in out

    rows = read_csv(results / "trials.csv")
    assert [row["state"] for row in rows] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert float(rows[2]["params_ce_weight"]) == 0.0 and rows[2]["epochs_trained"] == "2"
    summary = json.loads((results / "summary.json").read_text())
    assert summary["counts"]["pruned"] == 1 and summary["counts"]["complete"] == 2 and summary["smoke"]
    assert summary["budget"]["first_prune_epoch"] == 2 and summary["budget"]["n_trials"] == 3
    assert summary["importance"] is None and "2 complete trial(s)" in summary["importance_note"]
    for plot in ("optimization_history", "slice", "intermediate_values"):
        assert (results / "figures" / f"{plot}.png").read_bytes().startswith(b"\x89PNG")
    assert not (results / "figures/param_importances.png").exists()  # hidden below 10 complete trials
    assert not (trial_dirs / "0/final.pt").exists() and (trial_dirs / "0/metrics.json").exists()
    assert not (project / "checkpoints/sweeps").exists() or not any((project / "checkpoints/sweeps").iterdir())

    # MLflow: one run for the study (named after it, finished, its budget tagged), every trial's run
    # nested under it and named after the study, and the pruned trial not recorded as a failure.
    runs = mlflow_runs(raw, study.study_name)
    parents = [run for run in runs if run.info.run_name == study.study_name]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["budget"].startswith("3 trials x 3 of the run's 2 epochs")
    children = {run.info.run_name: run for run in runs if run.info.run_name != study.study_name}
    assert sorted(children) == [f"{study.study_name}-{n}" for n in range(3)]
    assert all(run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id for run in children.values())
    first, hopeless = children[f"{study.study_name}-0"], children[f"{study.study_name}-2"]
    assert "val/student/top1" in first.data.metrics and "methods.kd.temperature" in first.data.params
    assert first.info.status == "FINISHED" and hopeless.info.status != "FAILED"
    assert hopeless.data.tags.get("outcome") == "pruned"

    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    text = (results / "best_params.yaml").read_text()
    assert "A smoke test, not a tuning result" in text and "Train with them" not in text
    overlay = yaml.safe_load(text)
    assert overlay == {"methods": {"kd": best.params}}
    config = load_config("params.yaml", extra=overlay)
    params = get_method("kd").parse_params(config.methods["kd"])
    assert params.temperature == best.params["temperature"] and params.ce_weight == best.params["ce_weight"]

    # The results are a view of the storage: `report` rewrites them identically.
    (results / "best_params.yaml").unlink()
    assert main(["report", "--method", "kd", "--no-track"]) == 0
    assert (results / "best_params.yaml").read_text() == text


@pytest.mark.slow
def test_two_worker_processes_pinned_to_the_cpu_keep_the_budget_exact_when_one_is_killed_mid_trial(
        project: Path, prepared_root: Path, teacher_runs_root: Path) -> None:
    # An odd budget: the two workers cannot split it evenly, so one must stop at the right moment.
    # runtime.threads 0 (auto): --devices cpu splits the cores between the two workers.
    config_path = write_params(prepared_root, project, teacher_runs_root, n_trials=3, epochs_per_trial=2,
                               runtime={"threads": 0})
    raw = enable_mlflow(config_path)
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
    # What the dead worker left is finished in this process.
    assert main(["run", "--method", "kd", "--workers", "2", "--devices", "cpu", "--quiet"]) == 0
    killer.join()

    assert (project / "studies/kd.db").is_file()  # the default storage
    assert killed, "no worker was killed"
    trials = study.get_trials()
    dead = trials[killed[0]]
    assert dead.state == TrialState.FAIL and not uses_budget(dead)
    [retry] = [t for t in trials if retried_from(t) == dead.number]
    assert retry.params == dead.params and retry.state == TrialState.COMPLETE
    counted = [t for t in trials if uses_budget(t)]
    assert len(counted) == 3 and all(t.state == TrialState.COMPLETE for t in counted)
    assert len({tuple(sorted(t.params.items())) for t in counted}) == 3  # no duplicated parameters
    assert os.getpid() not in {dead.user_attrs[WORKER_ATTR]["pid"], counted[0].user_attrs[WORKER_ATTR]["pid"]}
    # Each spawned worker ran on the CPU with its share of the cores.
    cores = len(os.sched_getaffinity(0))
    spawned = [t.user_attrs[WORKER_ATTR] for t in trials if t.user_attrs[WORKER_ATTR]["pid"] != os.getpid()]
    assert spawned and all(w["device"] == "cpu" and w["threads"] == max(1, cores // 2) for w in spawned)
    assert len(read_csv(project / "sweep-results/kd/trials.csv")) == len(trials)
    # Every trial's run nests under the study run this process opened and finished (the spawned
    # workers reopen it by its key). The killed trial has one only if it got that far.
    runs = mlflow_runs(raw, study.study_name)
    [parent] = [run for run in runs if run.info.run_name == study.study_name]
    assert parent.info.status == "FINISHED"
    names = {run.info.run_name for run in runs if run is not parent}
    assert ({f"{study.study_name}-{t.number}" for t in counted} <= names
            <= {f"{study.study_name}-{t.number}" for t in trials})
    assert {run.data.tags.get("mlflow.parentRunId") for run in runs if run is not parent} == {parent.info.run_id}


@pytest.mark.slow
def test_rerun_resumes_keeps_earlier_trials_and_retries_a_killed_workers_trial(
        project: Path, prepared_root: Path, teacher_runs_root: Path) -> None:
    # A journal file has no heartbeat: replacing the killed worker's trial relies on its process id.
    write_params(prepared_root, project, teacher_runs_root, n_trials=2, epochs_per_trial=2,
                 storage="journal:studies/{method}.log")
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
    assert retried_from(retry) == 2 and retry.params == killed.params
    assert retry.user_attrs[WORKER_ATTR]["pid"] == os.getpid()  # rerun here, not a copy of the dead worker's marks
    counted = [t for t in trials if uses_budget(t)]
    assert [t.number for t in counted] == [0, 1, 3, 4]
    assert all(t.state == TrialState.COMPLETE for t in counted)
    # A rerun must not replay the first run's random start-up points.
    assert len({tuple(sorted(t.params.items())) for t in counted}) == len(counted)
    rows = read_csv(project / "sweep-results/kd/trials.csv")
    assert "interrupted" in rows[2]["error"] and rows[3]["retry_of"] == "2"


@pytest.mark.slow
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
    where = trials[1].user_attrs[TRACEBACK_ATTR]  # the engine's frames, for optuna-dashboard
    assert "reproduce/train/loop.py" in where and where.rstrip().splitlines()[-1].startswith("reproduce.train")
    assert uses_budget(trials[1])  # a verdict on its parameters: counted, not retried
    rows = read_csv(project / "sweep-results/dml/trials.csv")
    assert rows[1]["state"] == "FAIL" and rows[1]["error"] == error


@pytest.mark.slow
def test_a_failing_new_study_keeps_the_shown_study_until_it_has_results_of_its_own(
        project: Path, prepared_root: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import sweeps.objective

    results = project / "sweep-results/dml"
    write_params(prepared_root, project, method="dml", space=DML_SPACE, n_trials=1, epochs_per_trial=1)
    assert main(["run", "--method", "dml", "--quiet", "--no-track"]) == 0
    old = load_study_name("dml")
    old_summary = (results / "summary.json").read_text()
    assert (results / "trials" / old / "0/metrics.json").is_file()

    # Another study (longer trials) whose every trial fails: the budget is used, the run ends with an error,
    # and the previous study's results stay whole, per-trial folders included.
    def broken_train(config, spec, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("broken method")

    real_train = sweeps.objective.train
    monkeypatch.setattr(sweeps.objective, "train", broken_train)
    assert main(["run", "--method", "dml", "--set", "sweep.epochs_per_trial=2", "--set", "sweep.n_trials=2",
                 "--quiet", "--no-track"]) == 1
    new = load_study_name("dml", "sweep.epochs_per_trial=2")
    assert new != old and [t.state for t in load_study("dml", "sweep.epochs_per_trial=2").get_trials()] == \
        [TrialState.FAIL] * 2
    captured = capsys.readouterr()
    assert f"no trial of {new} completed; see sweep-results/dml/trials/{new}/trials.csv" in captured.err
    assert f"sweep-results/dml still shows study {old}" in captured.out
    assert (results / "summary.json").read_text() == old_summary
    assert (results / "trials" / old / "0/metrics.json").is_file() and (results / "best_params.yaml").is_file()
    failed = json.loads((results / "trials" / new / "summary.json").read_text())
    assert failed["best"] is None and failed["counts"]["failed"] == 2
    assert "broken method" in read_csv(results / "trials" / new / "trials.csv")[0]["error"]

    # Once the new study has a complete trial, it takes the folder over and the old trials go.
    monkeypatch.setattr(sweeps.objective, "train", real_train)
    assert main(["run", "--method", "dml", "--set", "sweep.epochs_per_trial=2", "--set", "sweep.n_trials=3",
                 "--quiet", "--no-track"]) == 0
    assert json.loads((results / "summary.json").read_text())["study"] == new
    assert sorted(path.name for path in (results / "trials").iterdir()) == [new]


@pytest.mark.slow
def test_multi_objective_study_gives_a_pareto_front_and_never_prunes(
        project: Path, prepared_root: Path, teacher_runs_root: Path) -> None:
    # This pruner would stop trials after epoch 1 in a single-objective study.
    write_params(prepared_root, project, teacher_runs_root, n_trials=3, epochs_per_trial=2,
                 pruner={"name": "median", "warmup_epochs": 0, "startup_trials": 0})
    # Results another study (other settings) left behind must not mix with this study's.
    stale = project / "sweep-results/kd/trials/kd-00000000/7"
    stale.mkdir(parents=True)
    (project / "sweep-results/kd/summary.json").write_text(json.dumps({"study": "kd-00000000"}))
    (project / "sweep-results/kd/figures").mkdir()
    (project / "sweep-results/kd/figures/param_importances.png").write_bytes(b"\x89PNG stale")

    assert main(["run", "--method", "kd", "--multi-objective", "--quiet", "--no-track"]) == 0
    assert not stale.parent.exists() and not (project / "sweep-results/kd/figures/param_importances.png").exists()

    study = load_study("kd", "sweep.multi_objective=true")
    assert study.study_name != load_study_name("kd")  # two objectives: another study
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert all(not t.intermediate_values and t.user_attrs["epochs_trained"] == 2 for t in trials)
    assert all(0 <= t.values[1] <= 1 for t in trials)  # ECE is a fraction

    results = project / "sweep-results/kd"
    front = study.best_trials
    pareto = read_csv(results / "pareto.csv")
    assert sorted(int(row["number"]) for row in pareto) == sorted(t.number for t in front)
    most_accurate = max(front, key=lambda t: (t.values[0], -t.values[1]))
    assert yaml.safe_load((results / "best_params.yaml").read_text()) == {"methods": {"kd": most_accurate.params}}
    assert set(read_csv(results / "trials.csv")[0]) >= {"val_top1", "val_ece"}
    assert (results / "figures/pareto_front.png").read_bytes().startswith(b"\x89PNG")
    summary = json.loads((results / "summary.json").read_text())
    assert [o["name"] for o in summary["objectives"]] == ["val_top1", "val_ece"]
    assert summary["best"]["values"] == {"val_top1": most_accurate.values[0], "val_ece": most_accurate.values[1]}


@pytest.mark.slow
def test_method_all_runs_every_listed_study_in_one_process(
        project: Path, prepared_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sweeps.objective

    processes = set()
    real_train = sweeps.objective.train

    def train_here(config, spec, **kwargs):  # type: ignore[no-untyped-def]
        processes.add(os.getpid())
        return real_train(config, spec, **kwargs)

    monkeypatch.setattr(sweeps.objective, "train", train_here)
    # dml searches the override below, switokd its own registered space.
    write_params(prepared_root, project, method="dml", space=DML_SPACE, n_trials=1, epochs_per_trial=1,
                 methods=["switokd", "dml"])

    assert main(["run", "--method", "all", "--quiet", "--no-track"]) == 0

    assert processes == {os.getpid()}
    for method in ("switokd", "dml"):
        summary = json.loads((project / f"sweep-results/{method}/summary.json").read_text())
        [trial] = load_existing_study(summary["study"], f"sqlite:///studies/{method}.db").get_trials()
        assert trial.state == TrialState.COMPLETE
        expected = DML_SPACE if method == "dml" else get_method(method).search_space
        assert set(trial.params) == set(expected)
    # A comma list runs those, in that order; a finished study only reports.
    assert main(["run", "--method", "dml,switokd", "--quiet", "--no-track"]) == 0
