"""The sweeps package without real training (fast): settings and spaces, study names, the trial's
schedule and pruning, the sampler, worker death and devices, storage errors, the results' format and
which study a results folder shows, and the package's own structure."""

from __future__ import annotations

import ast
import itertools
import json
import os
import socket
import subprocess
import sys
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
from sweeps.plan import MIN_COMPLETE_TRIALS, first_prune_epoch, make_pruner, plan_job, trial_config
from sweeps.settings import select_methods, swept_methods
from test_sweeps import DML_SPACE, KD_SPACE, load_study, read_csv, write_params

SWEEPS = PROJECT / "sweeps"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def no_outputs(project: Path) -> bool:
    return not (project / "studies").exists() and not (project / "sweep-results").exists()


# ----------------------------------------------------------------------------------------------
# Settings, spaces and errors before any trial


def test_search_spaces_come_from_the_registry_and_params_yaml_replaces_one(prepared_root: Path,
                                                                           tmp_path: Path) -> None:
    config = tiny_config(prepared_root, tmp_path, sweep={"spaces": {"dml": DML_SPACE, "kd": {}}})
    settings = config.sweep
    swept = [cls.name for cls in registered() if getattr(cls, "search_space", {})]
    assert swept, "no registered method declares a search space"
    # The default list: every registered method with a space, in table order, less the emptied kd.
    assert swept_methods(settings) == [name for name in swept if name != "kd"]
    assert set(plan_job(config, "dml").space) == set(DML_SPACE)  # replaced, not merged
    assert plan_job(config, "kd") is None  # emptied by the override: not swept
    other = next(name for name in swept if name not in ("dml", "kd"))
    assert set(plan_job(config, other).space) == set(get_method(other).search_space)
    assert select_methods(settings, "all") == swept_methods(settings)
    assert select_methods(settings, " dml, kd ,dml") == ["dml", "kd"]
    with pytest.raises(ConfigError, match="unknown method 'kdd'"):
        select_methods(settings, "dml,kdd")


def test_a_sweep_without_a_validation_split_is_a_clear_error_before_any_trial(
        project: Path, prepared_root: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import sweeps.objective

    monkeypatch.setattr(sweeps.objective, "train", lambda *args, **kwargs: pytest.fail("a trial ran"))
    write_params(prepared_root, project, method="dml", space=DML_SPACE, dataset={"val_fraction": 0})

    assert main(["run", "--method", "dml", "--no-track"]) == 2

    err = capsys.readouterr().err
    assert "a sweep scores every trial on the validation split, and dataset.val_fraction is 0" in err
    assert "Set dataset.val_fraction > 0" in err
    assert no_outputs(project)  # no study created


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
    import sweeps.objective

    monkeypatch.setattr(sweeps.objective, "train", lambda *args, **kwargs: pytest.fail("a trial ran"))
    write_params(prepared_root, project, method=method, space=space)

    assert main(["run", "--method", method]) == 2

    assert message in capsys.readouterr().err
    assert no_outputs(project)  # no study, no results


@pytest.mark.parametrize("space", [KD_SPACE, {"ce_weight": KD_SPACE["ce_weight"]}])
def test_a_bad_fixed_coefficient_is_blamed_on_its_own_key_not_on_a_search_range(
        project: Path, prepared_root: Path, capsys: pytest.CaptureFixture[str], space: dict) -> None:
    # Issue 22.9: methods.kd.temperature -1 was reported as "sweep.spaces.kd.ce_weight: kd rejects ce_weight=0.0".
    write_params(prepared_root, project, method="kd", space=space, method_params={"kd": {"temperature": -1}})

    assert main(["run", "--method", "kd", "--no-track"]) == 2

    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: methods.kd.temperature: must be > 0, got -1")
    assert no_outputs(project)


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
    ({"heartbeat": {"interval_s": 60, "grace_s": 30}},
     "sweep.heartbeat: need interval_s >= 1 and grace_s > interval_s"),
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
    assert no_outputs(project)


def test_settings_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"sweep\.n_trials: must be >= 1"):
        load_config(PROJECT / "params.yaml", ["sweep.n_trials=0"])


def test_shipped_params_give_a_valid_study_to_every_method_with_a_space() -> None:
    config = load_config(PROJECT / "params.yaml")
    settings = config.sweep
    for method in METHODS.names():  # every shipped space is valid against its method now
        plan_job(config, method)
    assert swept_methods(settings) and all(plan_job(config, method) is not None for method in swept_methods(settings))
    registry = PROJECT / "registry.yaml"  # what dvc.yaml iterates over, generated from the registry
    if registry.is_file() and not settings.spaces:
        assert swept_methods(settings) == yaml.safe_load(registry.read_text())["registry"]["sweep"]


def test_help_documents_run_and_report(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "run" in text and "report" in text and "optuna-dashboard" in text and "--method all" in text
    assert "sweep.n_trials=20 --set sweep.epochs_per_trial=8" in text  # the documented study budget
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "--workers" in out and "--devices" in out


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


# ----------------------------------------------------------------------------------------------
# A trial's schedule and its pruning


def test_pruning_waits_past_half_the_trial_and_never_acts_where_it_could_not(prepared_root: Path,
                                                                              tmp_path: Path) -> None:
    def settings(**sweep: object):  # type: ignore[no-untyped-def]
        return tiny_config(prepared_root, tmp_path, sweep=sweep).sweep

    median = {"name": "median", "warmup_epochs": 1}
    assert isinstance(make_pruner(settings(epochs_per_trial=3, pruner=median)), optuna.pruners.MedianPruner)
    assert first_prune_epoch(settings(epochs_per_trial=3, pruner=median)) == 2
    # Issue 21.3: the shipped pruner (warm-up 0) cut 2-epoch trials after epoch 1; now no check comes
    # before more than half the trial, and after the last epoch there is none.
    shipped = {"name": "median", "warmup_epochs": 0, "startup_trials": 2}
    assert first_prune_epoch(settings(epochs_per_trial=2, pruner=shipped)) is None
    assert isinstance(make_pruner(settings(epochs_per_trial=2, pruner=shipped)), optuna.pruners.NopPruner)
    assert first_prune_epoch(settings(epochs_per_trial=8, pruner=shipped)) == 5
    assert first_prune_epoch(settings(epochs_per_trial=30, pruner={"name": "median", "warmup_epochs": 20})) == 21
    pruner = make_pruner(settings(epochs_per_trial=8, pruner=shipped))
    assert isinstance(pruner, optuna.pruners.MedianPruner)
    assert first_prune_epoch(settings(epochs_per_trial=3, pruner=median, multi_objective=True)) is None
    assert isinstance(make_pruner(settings(epochs_per_trial=5, pruner={"name": "hyperband"})),
                      optuna.pruners.HyperbandPruner)
    # The median pruner itself never cuts before that epoch, even with a hopeless trial and no start-up.
    study = optuna.create_study(direction="maximize", pruner=make_pruner(settings(
        epochs_per_trial=8, pruner={"name": "median", "warmup_epochs": 0, "startup_trials": 0})))
    for value in (90.0, 91.0):
        good = study.ask()
        for epoch in range(1, 9):
            good.report(value, epoch)
        study.tell(good, value)
    hopeless = study.ask()
    cut = []
    for epoch in range(1, 9):
        hopeless.report(10.0, epoch)
        cut.append(hopeless.should_prune())
    assert cut.index(True) + 1 == 5


def test_a_trial_keeps_the_methods_warm_up_inside_it(prepared_root: Path, tmp_path: Path) -> None:
    # Issue 21.3: DKD/AEKT warm up over 3 epochs, a trial had 2, so the distillation term never reached
    # full weight. A trial scales every epoch-counted setting: the warm-up ends at the same fraction of
    # the trial as of the run, and always within the trial.
    from sweeps.plan import scaled_settings

    for run_epochs in (1, 2, 3, 8, 20, 240):
        config = tiny_config(prepared_root, tmp_path, recipe={"epochs": run_epochs})
        for method, trial_epochs, warmup in itertools.product(("dkd", "aekt"), (1, 2, 3, 5, 8, 30), (1, 3, 20)):
            key = f"methods.{method}.warmup_epochs"
            change = scaled_settings(config, method, trial_epochs, {"warmup_epochs": warmup}).get(key)
            scaled = warmup if change is None else change["trial"]
            assert change is None or change["run"] == warmup
            assert 1 <= scaled <= trial_epochs, (run_epochs, trial_epochs, warmup, scaled)
            if warmup <= run_epochs and scaled > 1:  # the same fraction of the trial as of the run
                assert abs(scaled / trial_epochs - warmup / run_epochs) <= 0.5 / trial_epochs + 1e-9
    # The trial's configuration carries the scaled value; the base configuration keeps the run's.
    config = tiny_config(prepared_root, tmp_path, recipe={"epochs": 20}, methods={"dkd": {"warmup_epochs": 10}},
                         sweep={"epochs_per_trial": 4})
    trial = trial_config(plan_job(config, "dkd"), {})
    assert trial.methods["dkd"]["warmup_epochs"] == 2 and trial.recipe.epochs == 4
    assert get_method("dkd").parse_params(config.methods["dkd"]).warmup_epochs == 10


def test_the_embedded_default_dkd_trial_reaches_full_distillation_weight_and_says_so() -> None:
    from sweeps.plan import describe_budget

    config = load_config(PROJECT / "params.yaml", ["sweep.epochs_per_trial=2"])
    job = plan_job(config, "dkd")
    trial = trial_config(job, {})
    assert config.methods["dkd"]["warmup_epochs"] == 3 and config.recipe.epochs == 8
    assert trial.methods["dkd"]["warmup_epochs"] == 1  # round(3 * 2 / 8): full weight from epoch 1 of 2
    text = describe_budget(config, "dkd", job.settings)
    assert text.endswith("no pruning; scaled to the trial: methods.dkd.warmup_epochs 3 -> 1")


def test_a_step_schedules_milestones_and_learning_rate_warm_up_scale_with_the_trial(prepared_root: Path,
                                                                                     tmp_path: Path) -> None:
    config = tiny_config(prepared_root, tmp_path, recipe={"epochs": 240, "schedule": {
        "name": "step", "milestones": [150, 180, 210], "warmup_epochs": 4}}, sweep={"epochs_per_trial": 30})
    trial = trial_config(plan_job(config, "kd"), {"temperature": 4.0})
    assert trial.recipe.schedule.milestones == [19, 22, 26]  # 150, 180, 210 of 240 as epochs of 30
    assert trial.recipe.schedule.warmup_epochs == 0.5
    assert trial.methods["kd"]["temperature"] == 4.0 and trial.recipe.epochs == 30
    assert config.recipe.schedule.milestones == [150, 180, 210]  # the base config is not modified


# ----------------------------------------------------------------------------------------------
# Sampler, worker processes, devices


def test_trial_seeded_sampler_is_reproducible_whatever_the_worker() -> None:
    from sweeps.objective import TrialSeededTPESampler

    def draws(study_seed: int = 0) -> list[tuple]:
        # A new sampler per call: another process or machine, which the same trial must not depend on.
        study = optuna.create_study(sampler=TrialSeededTPESampler(study_seed))
        # Past the 10 random start-up trials: TPE's own draws are seeded per trial too.
        study.optimize(lambda t: t.suggest_float("x", 0, 1) + len(t.suggest_categorical("c", ["a", "bb"])),
                       n_trials=13)
        return [tuple(sorted(t.params.items())) for t in study.trials]

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    first = draws()
    assert draws() == first
    assert len(set(first)) == len(first)  # different trials, different draws
    assert draws(study_seed=1) != first


def test_a_worker_is_dead_when_its_process_is_gone_or_its_id_was_recycled() -> None:
    from sweeps.budget import this_worker, worker_is_dead

    here = this_worker()
    assert here["started"] is not None  # Linux: /proc gives each process its start time
    assert not worker_is_dead(here, here)
    assert worker_is_dead({**here, "started": "0"}, here)  # same id, a process that started at another time
    assert worker_is_dead({**here, "boot": "an earlier boot"}, here)
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert worker_is_dead({**here, "pid": process.pid, "started": None}, here)
    assert not worker_is_dead({**here, "host": "another-machine", "pid": process.pid}, here)  # the heartbeat's job


def test_workers_are_pinned_round_robin_to_the_devices(prepared_root: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # The slots are the fan-out's (reproduce/launch/devices.py, tested with it); here: what a sweep's
    # worker does with its slot.
    from reproduce.launch.devices import WorkerSlot, worker_slots
    from sweeps.workers import pinned

    cores = len(os.sched_getaffinity(0))
    slots = worker_slots(3, ["0", "1"], configured_threads=0)
    assert [slot.device for slot in slots] == ["0", "1", "0"] and {s.threads for s in slots} == {max(1, cores // 3)}

    job = plan_job(tiny_config(prepared_root, tmp_path, runtime={"threads": 0}, sweep={"spaces": {"kd": KD_SPACE}}),
                   "kd")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    # In its own process a GPU worker sees only its GPU; in this process the device is named instead.
    spawned = pinned(job, WorkerSlot(1, "1", 4), own_process=True)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert spawned.config.runtime.device == "cuda" and spawned.config.runtime.threads == 4
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert pinned(job, WorkerSlot(0, "1"), own_process=False).config.runtime.device == "cuda:1"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    on_cpu = pinned(job, WorkerSlot(0, "cpu", 1), own_process=True)
    assert on_cpu.config.runtime.device == "cpu" and on_cpu.config.runtime.threads == 1
    assert pinned(job, WorkerSlot(0), own_process=True) is job  # no --devices: as configured
    assert job.config.runtime.device == "auto" and job.config.runtime.threads == 0  # the job itself is untouched


def test_a_bad_devices_option_is_one_line_before_any_study(project: Path, prepared_root: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    write_params(prepared_root, project, method="dml", space=DML_SPACE)
    assert main(["run", "--method", "dml", "--no-track", "--workers", "2", "--devices", "gpu0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --devices 'gpu0': give auto, cpu, or GPU indices such as 0,1,2"
    assert no_outputs(project)


# ----------------------------------------------------------------------------------------------
# Storage errors: one line naming the storage and the fix, exit code 2


def test_a_corrupt_study_database_is_one_line_naming_it_and_the_fix(
        project: Path, prepared_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_params(prepared_root, project, method="dml", space=DML_SPACE)
    (project / "studies").mkdir()
    (project / "studies/dml.db").write_bytes(os.urandom(4096))

    for command in (["run", "--method", "dml", "--no-track"], ["report", "--method", "dml", "--no-track"]):
        assert main(command) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("error: study storage studies/dml.db: not an SQLite database Optuna can read "
                               "(file is not a database)")
        assert "mv studies/dml.db studies/dml.db.bad" in line


def test_a_corrupt_journal_file_is_one_line_naming_it_and_the_fix(
        project: Path, prepared_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_params(prepared_root, project, method="dml", space=DML_SPACE, storage="journal:studies/{method}.log")
    (project / "studies").mkdir()
    (project / "studies/dml.log").write_bytes(b"\xff\xfe" + os.urandom(512))

    assert main(["run", "--method", "dml", "--no-track"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: study storage studies/dml.log: not an Optuna journal file it can read")


def test_an_unreachable_database_server_is_one_line_without_the_password(
        project: Path, prepared_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("psycopg")
    with socket.socket() as probe:  # a port nothing listens on: the connection is refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql+psycopg://optuna:secret@127.0.0.1:{port}/optuna"
    write_params(prepared_root, project, method="dml", space=DML_SPACE)

    assert main(["run", "--method", "dml", "--no-track", "--storage", url]) == 2

    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: study storage postgresql+psycopg://optuna:***@127.0.0.1:{port}/optuna: "
                           f"cannot use it (")
    assert "start the database server or fix the URL" in line and "secret" not in line


# ----------------------------------------------------------------------------------------------
# Results: format, budget honesty, which study a folder shows


def synthetic_study(storage: str, name: str, n_complete: int, n_failed: int = 0,
                    report: bool = True) -> optuna.Study:
    """A study as a sweep leaves it, without training: objective val_top1, KD's parameters."""
    from sweeps.budget import EPOCHS_ATTR, ERROR_ATTR

    study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        study.set_metric_names(["val_top1"])
    for index in range(n_complete + n_failed):
        trial = study.ask()
        temperature = trial.suggest_float("temperature", 1, 8)
        kd_weight = trial.suggest_float("kd_weight", 0.1, 1)
        trial.set_user_attr(EPOCHS_ATTR, 2)
        if index < n_complete:
            if report:  # a per-epoch value: the intermediate-values figure
                trial.report(50.0, 1)
            study.tell(trial, 90 - (temperature - 4) ** 2 + kd_weight)
        else:
            trial.set_user_attr(ERROR_ATTR, "RuntimeError: broken")
            study.tell(trial, state=TrialState.FAIL)
    return study


@pytest.mark.parametrize("n_complete", [3, pytest.param(MIN_COMPLETE_TRIALS, marks=pytest.mark.slow)])  # slow: fANOVA
def test_results_say_their_budget_and_hide_importances_of_a_smoke_test(tmp_path: Path, n_complete: int) -> None:
    from sweeps.report import write_results

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    config = load_config(PROJECT / "params.yaml")
    settings = config.sweep
    storage = f"sqlite:///{tmp_path / 'kd.db'}"
    study = synthetic_study(storage, "kd-synthetic", n_complete, n_failed=1)

    import matplotlib

    style = matplotlib.rcParams["axes.facecolor"]
    summary = write_results(study, "kd", config, storage_url=storage, track=False, root=tmp_path / "results")
    assert matplotlib.rcParams["axes.facecolor"] == style  # Optuna's ggplot style stayed inside its plots

    folder = tmp_path / "results/kd"
    assert summary == json.loads((folder / "summary.json").read_text())
    assert summary["format"] == 1 and summary["method"] == "kd" and summary["study"] == "kd-synthetic"
    assert summary["metric"] == "val_top1" and summary["direction"] == "maximize"
    budget = summary["budget"]
    assert {key: budget[key] for key in ("n_trials", "epochs_per_trial", "run_epochs", "seed")} == {
        "n_trials": settings.n_trials, "epochs_per_trial": settings.epochs_per_trial,
        "run_epochs": config.recipe.epochs, "seed": settings.seed}
    assert budget["text"].startswith(f"{settings.n_trials} trials x {settings.epochs_per_trial} of "
                                     f"the run's {config.recipe.epochs} epochs")
    assert {"pruner", "warmup_epochs", "sampler", "first_prune_epoch"} <= set(budget)
    assert summary["counts"] == {"complete": n_complete, "pruned": 0, "failed": 1, "interrupted": 0, "running": 0,
                                 "waiting": 0}
    best = study.best_trial
    assert summary["best"] == {"trial": best.number, "value": best.value, "values": {"val_top1": best.value},
                               "params": best.params}
    rows = read_csv(folder / "trials.csv")
    assert list(rows[0]) == ["number", "state", "val_top1", "epochs_trained", "duration_s", "params_kd_weight",
                             "params_temperature", "retry_of", "error"]
    assert rows[-1]["state"] == "FAIL" and rows[-1]["error"] == "RuntimeError: broken"
    figures = {path.name for path in (folder / "figures").iterdir()}
    header = (folder / "best_params.yaml").read_text().split("methods:")[0]
    assert f"budget {budget['text']}" in header
    if n_complete < MIN_COMPLETE_TRIALS:
        assert summary["smoke"] and summary["importance"] is None
        assert summary["importance_note"].startswith(f"{n_complete} complete trial(s); importances need at least 10")
        assert "param_importances.png" not in figures
        assert "A smoke test, not a tuning result" in header and "Train with them" not in header
    else:
        assert not summary["smoke"] and summary["importance_note"] is None
        assert set(summary["importance"]["val_top1"]) == {"temperature", "kd_weight"}
        assert max(summary["importance"]["val_top1"], key=summary["importance"]["val_top1"].get) == "temperature"
        assert "param_importances.png" in figures
        assert "Train with them: python -m reproduce train --method kd --params-from" in header
    assert {"optimization_history.png", "slice.png", "intermediate_values.png"} <= figures
    assert all((folder / name).is_file() for name in summary["files"]["figures"])


def test_a_study_without_results_never_displaces_one_with_results(tmp_path: Path) -> None:
    # Issue 22.8, without training (the end-to-end version is in test_sweeps.py).
    from sweeps.report import write_results

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    config = load_config(PROJECT / "params.yaml")
    storage = f"sqlite:///{tmp_path / 'kd.db'}"
    root, folder = tmp_path / "results", tmp_path / "results/kd"
    shown = synthetic_study(storage, "kd-shown", n_complete=2, report=False)
    (folder / "trials/kd-shown/0").mkdir(parents=True)
    (folder / "trials/kd-shown/0/metrics.json").write_text("{}")
    write_results(shown, "kd", config, storage_url=storage, track=False, root=root)
    before = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}

    failing = synthetic_study(storage, "kd-failing", n_complete=0, n_failed=2)
    summary = write_results(failing, "kd", config, storage_url=storage, track=False, root=root)

    assert summary["results_dir"] == str(folder / "trials/kd-failing") and summary["best"] is None
    assert "still shows study kd-shown" in summary["kept"]
    assert {path: path.read_bytes() for path in before} == before  # every file of the shown study as it was
    assert json.loads((folder / "trials/kd-failing/summary.json").read_text())["counts"]["failed"] == 2

    winning = synthetic_study(storage, "kd-failing-then-winning", n_complete=1, report=False)
    write_results(winning, "kd", config, storage_url=storage, track=False, root=root)
    assert json.loads((folder / "summary.json").read_text())["study"] == "kd-failing-then-winning"
    assert not (folder / "trials").exists() or not any((folder / "trials").iterdir())


def test_a_study_whose_every_trial_fails_ends_with_an_error(
        project: Path, prepared_root: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import sweeps.objective

    def broken_train(config, spec, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("broken method")

    monkeypatch.setattr(sweeps.objective, "train", broken_train)
    write_params(prepared_root, project, method="dml", space=DML_SPACE, n_trials=2)

    assert main(["run", "--method", "dml", "--quiet", "--no-track"]) == 1  # failed trials use the budget: it ends

    assert [t.state for t in load_study("dml").get_trials()] == [TrialState.FAIL] * 2
    assert "no trial of dml-" in capsys.readouterr().err
    assert not (project / "sweep-results/dml/best_params.yaml").exists()
    assert json.loads((project / "sweep-results/dml/summary.json").read_text())["counts"]["failed"] == 2


# ----------------------------------------------------------------------------------------------
# The package's structure (issue 18.4)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_sweeps_is_small_files_without_import_circles_above_the_library_on_optunas_public_api() -> None:
    modules = {path.stem: path for path in SWEEPS.glob("*.py")}
    graph = {name: {module.split(".")[1] for module in _imports(path) if module.startswith("sweeps.")}
             for name, path in modules.items()}
    for name, path in modules.items():
        assert len(path.read_text().splitlines()) <= 400, f"sweeps/{path.name} is over 400 lines"
        assert not {m for m in _imports(path) if m.split(".")[0] in ("analysis", "pipeline")}, path
        source = path.read_text()
        for private in ("._storage", "._trial_id", "._study_id", "._rng", "._random_sampler"):
            assert private not in source, f"sweeps/{path.name} uses Optuna's private {private}"

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import circle: {' -> '.join(path + (name,))}"
        for dependency in graph.get(name, ()):
            visit(dependency, path + (name,))

    for name in graph:
        visit(name, ())
