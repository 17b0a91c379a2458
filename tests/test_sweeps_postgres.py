"""Optuna studies on a real PostgreSQL server (the storage clusters share), started for these tests.

Without the server binaries or the driver these tests skip, except in CI (CI=true), where .ci/run
installs both and a skip would hide a broken setup: there they fail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Iterator

import pytest
from optuna.trial import TrialState

from conftest import PROJECT
from pg_server import PostgresServer, missing_requirements, wait_for
from reproduce.config import load_config
from sweeps.__main__ import main
from sweeps.budget import ERROR_ATTR, WORKER_ATTR, retried_from, uses_budget
from sweeps.plan import plan_job
from sweeps.storage import open_storage
from sweeps.study import create_or_load_study
from test_sweeps import DML_SPACE, read_csv, write_params

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    missing = missing_requirements()
    if missing:
        reason = "PostgreSQL sweep tests need " + "; ".join(missing)
        if in_ci():
            pytest.fail(f"{reason}. CI=true: .ci/run installs them, so their absence is a broken setup, not a "
                        f"reason to skip")
        pytest.skip(reason)
    server = PostgresServer(tmp_path_factory.mktemp("postgres")).start()
    yield server
    server.stop()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def database(postgres: PostgresServer) -> str:
    """A fresh database per test: its URL."""
    return postgres.create_database(f"sweep_{uuid.uuid4().hex[:12]}")


def sweep_process(project: Path, *args: str) -> subprocess.Popen:
    """``python -m sweeps run`` as its own process: a worker as another machine would start it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "sweeps", "run", "--method", "dml", "--quiet", "--no-track", *args],
                            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_workers_on_postgres_keep_the_budget_exact_when_one_is_killed_mid_trial(
        project: Path, prepared_root: Path, database: str) -> None:
    write_params(prepared_root, project, method="dml", space=DML_SPACE, n_trials=3, epochs_per_trial=2,
                 storage=database)
    job = plan_job(load_config("params.yaml"), "dml")
    study = create_or_load_study(job)
    # Both workers start at once on the new study: they race to create Optuna's tables and to number trials.
    victim, survivor = sweep_process(project), sweep_process(project)
    try:
        def running(pid: int) -> list:
            return [t for t in study.get_trials() if t.state == TrialState.RUNNING
                    and t.user_attrs.get(WORKER_ATTR, {}).get("pid") == pid and len(t.params) == len(DML_SPACE)]

        def both_at_work() -> list:
            assert victim.poll() is None, f"the first worker exited early:\n{victim.stdout.read()}"
            return running(victim.pid) if any(t.user_attrs.get(WORKER_ATTR, {}).get("pid") == survivor.pid
                                              for t in study.get_trials()) else []

        [killed] = wait_for(both_at_work, 180, "both workers to have started a trial")
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        output = survivor.communicate(timeout=300)[0]
    finally:
        for process in (victim, survivor):
            if process.poll() is None:
                process.kill()
                process.wait()
    assert survivor.returncode == 0, output

    trials = study.get_trials()
    killed = trials[killed.number]
    # The killed trial: failed, with no error of its own (interrupted), not counted...
    assert killed.state == TrialState.FAIL and ERROR_ATTR not in killed.user_attrs and not uses_budget(killed)
    # ... and replaced exactly once, by a retry of its parameters that the survivor ran to the end.
    [retry] = [t for t in trials if retried_from(t) == killed.number]
    assert retry.params == killed.params and retry.state == TrialState.COMPLETE
    assert retry.user_attrs[WORKER_ATTR]["pid"] == survivor.pid
    # The budget, exactly: n_trials counted trials, all complete, no parameters evaluated twice, and no
    # other failed trial (a surplus step-back is the only other kind, and it is not counted).
    counted = [t for t in trials if uses_budget(t)]
    assert len(counted) == 3 and all(t.state == TrialState.COMPLETE for t in counted)
    assert len({tuple(sorted(t.params.items())) for t in counted}) == 3
    assert not [t for t in trials if t.state == TrialState.RUNNING or t.state == TrialState.WAITING]
    assert {t.user_attrs[WORKER_ATTR]["pid"] for t in trials} <= {victim.pid, survivor.pid}
    rows = read_csv(project / "sweep-results/dml/trials.csv")
    assert len(rows) == len(trials)
    assert "interrupted" in rows[killed.number]["error"] and rows[retry.number]["retry_of"] == str(killed.number)


def test_a_dead_remote_workers_trial_is_found_by_the_heartbeat_and_retried(
        project: Path, prepared_root: Path, database: str, capsys: pytest.CaptureFixture[str]) -> None:
    # A worker on another machine cannot be checked by process id: only its heartbeat tells. A short
    # grace period keeps the test fast (a busy worker still writes its heartbeat every second).
    write_params(prepared_root, project, method="dml", space=DML_SPACE, n_trials=2, epochs_per_trial=1,
                 storage=database, heartbeat={"interval_s": 1, "grace_s": 6})
    job = plan_job(load_config("params.yaml"), "dml")
    study = create_or_load_study(job)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Optuna: a heartbeat storage is meant for optimize()
        remote = study.ask()
    params = {name: spec.suggest(remote, name) for name, spec in job.space.items()}
    remote.set_user_attr(WORKER_ATTR, {"host": "another-machine", "boot": "", "pid": 1, "started": None})
    storage = open_storage(database, job.settings.heartbeat)
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name),
                                                               remote.number)
    storage.record_heartbeat(trial_id)  # ...and then it died
    started = time.monotonic()

    assert main(["run", "--method", "dml", "--no-track"]) == 0

    assert time.monotonic() - started >= 6  # nothing could fail it before its grace period ran out
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and not uses_budget(trials[0])
    [retry] = [t for t in trials if retried_from(t) == 0]
    assert retry.params == params and retry.state == TrialState.COMPLETE
    assert [t.state for t in trials if uses_budget(t)] == [TrialState.COMPLETE] * 2
    assert "trial 0: its worker stopped mid-trial" in capsys.readouterr().out


def test_a_database_the_server_does_not_have_is_one_line_naming_it(
        project: Path, prepared_root: Path, postgres: PostgresServer, capsys: pytest.CaptureFixture[str]) -> None:
    write_params(prepared_root, project, method="dml", space=DML_SPACE, storage=postgres.url("no_such_database"))

    assert main(["run", "--method", "dml", "--no-track"]) == 2

    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: study storage {postgres.url('no_such_database')}: cannot use it (")
    assert "no_such_database" in line.split("cannot use it", 1)[1] and "start the database server" in line
