"""Faults across process boundaries and through real training (issue 22, points 4-7; slow): writers
killed at random moments, two processes on one run, a configuration change between runs, a full disk
during a run, a garbage metrics.json."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import reproduce.io
from reproduce.cli import main
from reproduce.io import TEMPORARY, clean_temporaries
from reproduce.train import RunSpec, train
from reproduce.train.lock import LOCK_NAME
from reproduce.train.rundir import aside_dir, config_hash
from tests.conftest import PROJECT, tiny_config

pytestmark = pytest.mark.slow

WRITER = """
import sys
from reproduce.io import atomic_write_bytes
target, size = sys.argv[1], int(sys.argv[2])
print("ready", flush=True)
version = 0
while True:
    version = version % 250 + 1
    atomic_write_bytes(target, bytes([version]) * size)
"""


def test_28_writers_killed_at_random_moments_leave_the_file_whole_and_temporaries_that_go(tmp_path: Path) -> None:
    target, size, rng = tmp_path / "last.pt", 8 * 2**20, random.Random(22)
    left_by_kill = []
    for _ in range(28):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(size)], cwd=PROJECT,
                                  stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.02, 0.3))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
        left_by_kill.append(sum(TEMPORARY.match(p.name) is not None for p in tmp_path.iterdir()) - sum(left_by_kill))
        content = target.read_bytes() if target.exists() else None
        assert content is None or (len(content) == size and content == content[:1] * size)  # never half a file
    temporaries = [p for p in tmp_path.iterdir() if TEMPORARY.match(p.name)]
    assert sum(left_by_kill) == len(temporaries) > 0  # some kills landed mid-write
    assert sorted(clean_temporaries(tmp_path)) == sorted(temporaries)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def params_file(tmp_path: Path, prepared_root: Path, **sections: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_config(prepared_root, tmp_path, **sections).to_dict()))
    return path


def test_a_second_writer_fails_at_once_and_a_killed_owners_lock_is_taken_over(prepared_root: Path,
                                                                              tmp_path: Path) -> None:
    params = params_file(tmp_path, prepared_root, recipe={"epochs": 30})
    command = [sys.executable, "-m", "reproduce", "train", "--params", str(params), "--method", "vanilla",
               "--out", str(tmp_path / "run"), "--no-track"]
    lock = tmp_path / "checkpoints" / "adhoc" / "run" / LOCK_NAME
    environment = {**os.environ, "PYTHONPATH": str(PROJECT)}
    owner = subprocess.Popen(command, cwd=tmp_path, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.read_text().strip() and (lock.parent / "last.pt").exists()):
            assert owner.poll() is None and time.monotonic() < deadline, owner.stderr.read() if owner.stderr else ""
            time.sleep(0.1)
        started = time.monotonic()
        second = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert second.stderr.startswith(f"error: {tmp_path / 'run'}: another process is writing this run (pid "
                                        f"{owner.pid} on {socket.gethostname()}, since ")
        assert f"lock {Path('checkpoints/adhoc/run') / LOCK_NAME}" in second.stderr
        print(f"second writer refused in {time.monotonic() - started:.1f} s (a Python start with torch)")
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    epoch = torch.load(lock.parent / "last.pt", weights_only=True)["epoch"]
    taker = subprocess.run([*command, "--stop-after-epoch", str(epoch + 1)], cwd=tmp_path, env=environment,
                           capture_output=True, text=True, timeout=300)
    assert taker.returncode == 0, taker.stderr
    assert f"the lock of pid {owner.pid} on {socket.gethostname()}" in taker.stdout  # taken over, and said so
    assert torch.load(lock.parent / "last.pt", weights_only=True)["epoch"] == epoch + 1  # resumed, not restarted
    assert not lock.exists()


def read_rows(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


def test_a_configuration_change_moves_the_run_aside_and_back(prepared_root: Path, tmp_path: Path, one_torch_thread,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    first = tiny_config(prepared_root, tmp_path)
    second = tiny_config(prepared_root, tmp_path, recipe={"optimizer": {"lr": 0.01}})
    spec = RunSpec("vanilla", 0, tmp_path / "run", tmp_path / "ckpt")
    train(first, spec, stop_after_epoch=1, track=False)
    first_history = read_rows(spec.run_dir / "history.tsv")
    train(second, spec, track=False)  # interrupted first run, new configuration: no file of the first stays
    kept = aside_dir(spec, config_hash(first, spec))
    assert read_rows(kept / "run" / "history.tsv") == first_history and len(first_history) == 2
    assert torch.load(kept / "last.pt", weights_only=True)["epoch"] == 1
    second_metrics = json.loads((spec.run_dir / "metrics.json").read_text())
    header, *rows = read_rows(spec.run_dir / "history.tsv")
    assert len(rows) == 2 and max(float(row[header.index("lr/student")]) for row in rows) <= 0.01
    assert "moved it aside to" in capsys.readouterr().out
    summary = train(first, spec, track=False)  # back to the first configuration: it resumes at epoch 2
    assert "resuming this configuration's run" in capsys.readouterr().out
    assert read_rows(spec.run_dir / "history.tsv")[:2] == first_history and summary["epochs"] == 2
    kept_second = aside_dir(spec, config_hash(second, spec))
    assert json.loads((kept_second / "run" / "metrics.json").read_text()) == second_metrics

    # a garbage metrics.json: the rerun writes it again from the finished checkpoint, without training
    history = (spec.run_dir / "history.tsv").read_text()
    (spec.run_dir / "metrics.json").write_bytes(b"\x00garbage{")
    again = train(first, spec, track=False)
    assert "metrics.json is not JSON" in capsys.readouterr().out
    assert (spec.run_dir / "history.tsv").read_text() == history
    assert again["last"] == summary["last"] and json.loads((spec.run_dir / "metrics.json").read_text())["last"] == \
        summary["last"]
    assert "already done" in (train(first, spec, track=False) and capsys.readouterr().out)


def test_a_full_disk_during_a_run_is_one_line_and_the_rerun_resumes(prepared_root: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch, one_torch_thread,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    params = params_file(tmp_path, prepared_root, recipe={"epochs": 2})
    command = ["train", "--params", str(params), "--method", "vanilla", "--out", "run", "--no-track"]
    checkpoint = (tmp_path / "checkpoints" / "adhoc" / "run").resolve()
    flush = reproduce.io._flush_to_disk
    failing: dict[Path, int] = {}  # file -> how many more writes of it succeed

    def full_for(path: Path) -> None:
        target = (path.parent / TEMPORARY.match(path.name)["name"]).resolve()
        if target in failing:
            failing[target] -= 1
            if failing[target] < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        flush(path)

    monkeypatch.setattr(reproduce.io, "_flush_to_disk", full_for)
    failing[checkpoint / "last.pt"] = 1  # epoch 1's checkpoint is written, epoch 2's finds the disk full (on the
    assert main(command) == 2            # writer thread)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {Path('checkpoints/adhoc/run/last.pt')}: no space left")
    assert torch.load(checkpoint / "last.pt", weights_only=True)["epoch"] == 1
    failing.clear()
    failing[tmp_path / "run" / "best.pt"] = 0  # the end of the run: the copy of best.pt into the run folder
    assert main(command) == 2
    assert capsys.readouterr().err.startswith(f"error: {Path('run/best.pt')}: no space left on the device")
    assert not (tmp_path / "run" / "best.pt").exists() and not list((tmp_path / "run").glob(".*.tmp"))
    history = (tmp_path / "run" / "history.tsv").read_text()
    failing.clear()
    assert main(command) == 0  # space freed: the run ends from its last checkpoint, nothing retrained
    assert (tmp_path / "run" / "best.pt").read_bytes() == (checkpoint / "best.pt").read_bytes()
    assert (tmp_path / "run" / "history.tsv").read_text() == history
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"] == 2
