"""Faults without a process boundary (issue 22, points 4-7): a full disk at any write, temporaries of
killed writes, two writers on one run, a configuration change in a run's folders, unreadable files.
The tests with real processes and real training are in test_faults_processes.py (slow)."""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

import pytest
import torch

from reproduce.cli import run_reporting_errors
from reproduce.io import (DiskFullError, atomic_copy, atomic_path, atomic_savefig, atomic_torch_save,
                          atomic_write_bytes, atomic_write_text, process_running, write_table)
from reproduce.models.pretrained import PretrainedError, read_checkpoint
from reproduce.train import CheckpointError, DivergedError, RunSpec, load_state
from reproduce.train.checkpoint import CHECKPOINT_FORMAT, resume_key
from reproduce.train.lock import LOCK_NAME, RunLockedError, run_lock, start_ticks
from reproduce.train.rundir import aside_dir, config_hash, exclusive, finished_summary, keep_one_run
from tests.conftest import tiny_config

PREVIOUS = b"the previous, whole file\n"


def _figure_writer(path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2, 2))
    figure.subplots().plot([0, 1], [1, 0])
    atomic_savefig(figure, path, dpi=50)


def _copy_writer(path: Path) -> None:
    source = path.with_name("source.bin")
    source.write_bytes(b"new" * 1000)
    atomic_copy(source, path)


# Every kind of file the suite writes: text, bytes, a copy, torch.save, a figure, a table.
WRITERS = {
    "text": lambda path: atomic_write_text(path, "new text\n" * 100),
    "bytes": lambda path: atomic_write_bytes(path, b"new" * 1000),
    "copy": _copy_writer,
    "torch": lambda path: atomic_torch_save({"weights": torch.ones(1000)}, path),
    "figure": _figure_writer,
    "table": lambda path: write_table(path, [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}]),
}


def siblings(path: Path) -> list[str]:
    return sorted(entry.name for entry in path.parent.iterdir() if entry.name != "source.bin")


def full_disk(*_: object, **__: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("kind", WRITERS)
def test_a_full_disk_at_any_write_keeps_the_previous_file_and_names_it(kind: str, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / ("result.png" if kind == "figure" else "result.out")
    path.write_bytes(PREVIOUS)
    monkeypatch.setattr(os, "fsync", full_disk)  # where a full disk (or a network file system) reports at the latest
    with pytest.raises(DiskFullError) as error:
        WRITERS[kind](path)
    message = str(error.value)
    assert message.startswith(f"{path}: no space left on the device while writing it")
    assert "is intact" in message and "Free space on that disk" in message and "\n" not in message
    assert path.read_bytes() == PREVIOUS and siblings(path) == [path.name]  # no temporary left behind
    monkeypatch.undo()
    WRITERS[kind](path)  # space freed: the same write succeeds
    assert path.read_bytes() != PREVIOUS and siblings(path) == [path.name]


def test_a_full_disk_in_the_middle_of_a_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails half way (text) and torch's writer, which hides the errno in a RuntimeError's context."""
    path = tmp_path / "last.pt"
    path.write_bytes(PREVIOUS)

    def half_then_full(self: Path, data: str, *_: object, **__: object) -> None:
        with open(self, "w") as stream:
            stream.write(data[: len(data) // 2])
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(DiskFullError, match=r"last\.pt: the disk quota is exceeded while writing it"):
        atomic_write_text(path, "x" * 1000)
    monkeypatch.undo()

    class FullAfter:
        def __init__(self) -> None:
            self.written = 0

        def write(self, data: bytes) -> int:
            if self.written > 100:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return len(data)

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

        def __enter__(self) -> FullAfter:
            return self

        def __exit__(self, *_: object) -> None:
            pass

    monkeypatch.setattr(Path, "open", lambda self, mode="r", *a, **k: FullAfter())
    with pytest.raises(DiskFullError, match=r"last\.pt: no space left on the device"):
        atomic_torch_save({"weights": torch.ones(10_000)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == PREVIOUS and siblings(path) == ["last.pt"]


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Path:
    """A real 1 MiB tmpfs (needs root or CAP_SYS_ADMIN; skipped otherwise)."""
    libc = ctypes.CDLL(None, use_errno=True)
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if libc.mount(b"tmpfs", str(mount_point).encode(), b"tmpfs", 0, b"size=1m") != 0:
        pytest.skip(f"cannot mount a tmpfs here ({os.strerror(ctypes.get_errno())}): the mocked full disk covers it")
    yield mount_point
    libc.umount2(str(mount_point).encode(), 2)  # MNT_DETACH


@pytest.mark.parametrize("kind", ["text", "bytes", "torch", "copy"])
def test_a_real_full_tmpfs(kind: str, tiny_tmpfs: Path) -> None:
    path = tiny_tmpfs / "result.out"
    path.write_bytes(PREVIOUS)
    big = {"text": lambda: atomic_write_text(path, "x" * 2**21),
           "bytes": lambda: atomic_write_bytes(path, b"x" * 2**21),
           "torch": lambda: atomic_torch_save(torch.zeros(2**19), path),
           "copy": lambda: _copy_big(path)}[kind]
    with pytest.raises(DiskFullError, match="no space left on the device"):
        big()
    assert path.read_bytes() == PREVIOUS and sorted(p.name for p in tiny_tmpfs.iterdir()) == ["result.out"]


def _copy_big(path: Path) -> None:
    source = path.parent.parent / "big.bin"  # outside the tmpfs
    source.write_bytes(b"x" * 2**21)
    atomic_copy(source, path)


def test_a_full_disk_is_one_line_with_exit_code_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(os, "fsync", full_disk)
    target = tmp_path / "run" / "metrics.json"
    assert run_reporting_errors(lambda _: atomic_write_text(target, "{}"), argparse.Namespace()) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {target}: no space left on the device"), err


# ----------------------------------------------------------------------------------------------
# Temporaries of killed writes


def dead_pid() -> int:
    """A pid no process has now."""
    pid = int(Path("/proc/sys/kernel/pid_max").read_text()) - 1
    while process_running(pid):
        pid -= 1
    return pid


def killed_write(path: Path, pid: int, abandoned: list) -> Path:
    """What a write killed before its rename leaves: the writer's own temporary sibling, half written.
    (The context is entered and never left; ``abandoned`` keeps it from being closed.)"""
    context = atomic_path(path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "getpid", lambda: pid)
        temporary = context.__enter__()
    temporary.write_bytes(os.urandom(1000))
    abandoned.append(context)
    return temporary


def test_temporaries_of_28_killed_writes_are_removed_at_the_next_start_and_nothing_else(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tiny_config(tmp_path / "prepared", tmp_path)
    spec = RunSpec("vanilla", 0, tmp_path / "runs" / "vanilla" / "seed0", tmp_path / "ckpt" / "vanilla" / "seed0")
    a_run(config, spec, 1, "AAAAA")  # a run of this configuration: it continues, nothing is moved aside
    dead, abandoned = dead_pid(), []
    names = ["last.pt", "best.pt", "best_predictions.pt", "history.tsv", "metrics.json", "final.pt", "code.tar.gz"]
    left = [killed_write(folder / name, dead, abandoned) for name in names
            for folder in (spec.checkpoint_dir, spec.run_dir, spec.run_dir / "figures", spec.checkpoint_dir / "x")]
    assert len(left) == 28 and all(path.exists() for path in left)
    kept = [killed_write(spec.run_dir / "history.tsv", os.getpid(), abandoned),  # a write in progress (ours)
            killed_write(tmp_path / "runs" / "vanilla" / "other.json", dead, abandoned)]  # not the run's folder
    for decoy in (".notes.tmp", ".history.tsv.tmp", ".a.123-abcdefgh.tmp.bak", "history.tsv.1234-abcdefgh.tmp"):
        (spec.run_dir / decoy).write_text("a user's file")
        kept.append(spec.run_dir / decoy)
    seen = []
    exclusive(lambda config, spec, resume: seen.append(sorted(p.name for p in spec.run_dir.rglob("*.tmp"))) or {})(
        config, spec)
    assert not any(path.exists() for path in left) and all(path.exists() for path in kept)
    assert seen == [sorted([".history.tsv.tmp", ".notes.tmp", "history.tsv.1234-abcdefgh.tmp", kept[0].name])]
    out = capsys.readouterr().out
    assert "removed 28 temporary files of interrupted writes (0.0 MiB)" in out


# ----------------------------------------------------------------------------------------------
# One writer per run


def test_a_second_writer_fails_at_once_naming_the_owner(tmp_path: Path) -> None:
    ckpt, run = tmp_path / "ckpt", tmp_path / "run"
    with run_lock(ckpt, run) as lock:
        owner = json.loads(lock.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(RunLockedError) as error, run_lock(ckpt, run):
            pass
        message = str(error.value)
        assert message.startswith(f"{run}: another process is writing this run (pid {os.getpid()} on "
                                  f"{socket.gethostname()}, since ") and f"lock {lock}" in message
        assert "\n" not in message and lock.exists()
    assert not lock.exists() and not ckpt.exists()  # released, and no empty folder left: the next run takes it
    with run_lock(ckpt, run):
        pass


def hold_flock(path: Path, owner: dict) -> object:
    """A descriptor holding the lock, as an orphaned child that inherited it would, with ``owner`` recorded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = path.open("w")
    fcntl.flock(stream, fcntl.LOCK_EX)
    stream.write(json.dumps(owner))
    stream.flush()
    return stream


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, run, host = tmp_path / "ckpt", tmp_path / "run", socket.gethostname()
    lock = ckpt / LOCK_NAME
    # 1. a killed owner: the kernel freed its flock, its record stays
    ckpt.mkdir()
    lock.write_text(json.dumps({"pid": dead_pid(), "host": host, "time": 0}))
    with run_lock(ckpt, run):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "taking over the lock of pid" in capsys.readouterr().out
    # 2. the owner is gone but a child still holds the flock; 3. the pid was reused by another process
    for owner in ({"pid": dead_pid(), "host": host}, {"pid": os.getpid(), "host": host, "started": -1}):
        orphan = hold_flock(lock, owner)
        with run_lock(ckpt, run):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
            assert os.fstat(orphan.fileno()).st_ino != lock.stat().st_ino  # a new lock file; the orphan keeps the old
        assert f"the lock of pid {owner['pid']} on {host}" in capsys.readouterr().out
        orphan.close()


def test_a_lock_held_on_another_host_is_not_taken(tmp_path: Path) -> None:
    lock = tmp_path / "ckpt" / LOCK_NAME
    holder = hold_flock(lock, {"pid": 4242, "host": "node-7", "time": 0})
    with pytest.raises(RunLockedError, match=r"another process is writing this run \(pid 4242 on node-7, since .*; "
                                             r"if it is gone, delete .*run\.lock"):
        with run_lock(tmp_path / "ckpt", tmp_path / "run"):
            pass
    holder.close()
    assert start_ticks(os.getpid()) is not None  # this host can tell a reused pid


# ----------------------------------------------------------------------------------------------
# One run per folder


def a_run(config, spec: RunSpec, epoch: int, tag: str) -> None:
    """A run's files as training leaves them: last.pt with its resume key, best.pt, and its run folder."""
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "key": resume_key(config, spec), "epoch": epoch},
                      spec.checkpoint_dir / "last.pt")
    atomic_write_bytes(spec.checkpoint_dir / "best.pt", tag.encode())
    for name in ("metrics.json", "history.tsv", "figures/curve.png"):
        atomic_write_text(spec.run_dir / name, tag)


def test_another_configuration_is_moved_aside_and_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = tiny_config(tmp_path / "prepared", tmp_path)
    second = tiny_config(tmp_path / "prepared", tmp_path, recipe={"optimizer": {"lr": 0.01}})
    spec = RunSpec("vanilla", 0, tmp_path / "run", tmp_path / "ckpt")
    a_run(first, spec, 3, "AAAAA")
    keep_one_run(second, spec, "auto")
    kept = aside_dir(spec, config_hash(first, spec))
    assert kept == tmp_path / f"ckpt.previous-{config_hash(first, spec)}"
    assert not list(spec.run_dir.rglob("*.*")) and not list(spec.checkpoint_dir.iterdir())
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*") if p.is_file()) == [
        "best.pt", "last.pt", "run/figures/curve.png", "run/history.tsv", "run/metrics.json"]
    assert f"held another run (config {config_hash(first, spec)}, epoch 3): moved it aside to {kept}/" in \
        capsys.readouterr().out
    a_run(second, spec, 1, "BBBBB")
    keep_one_run(second, spec, "auto")  # the same configuration continues: nothing moves
    assert (spec.run_dir / "metrics.json").read_text() == "BBBBB"
    assert not aside_dir(spec, config_hash(second, spec)).exists()
    keep_one_run(first, spec, "auto")  # going back: the first run returns, the second goes aside
    assert (spec.run_dir / "metrics.json").read_text() == "AAAAA"
    assert (spec.checkpoint_dir / "best.pt").read_text() == "AAAAA"
    assert torch.load(spec.checkpoint_dir / "last.pt", weights_only=True)["epoch"] == 3 and not kept.exists()
    assert (aside_dir(spec, config_hash(second, spec)) / "run" / "history.tsv").read_text() == "BBBBB"
    assert "resuming this configuration's run" in capsys.readouterr().out


def test_resume_never_and_always(tmp_path: Path) -> None:
    first = tiny_config(tmp_path / "prepared", tmp_path)
    second = tiny_config(tmp_path / "prepared", tmp_path, recipe={"epochs": 3})
    spec = RunSpec("vanilla", 0, tmp_path / "run", tmp_path / "ckpt")
    a_run(first, spec, 2, "AAAAA")
    keep_one_run(first, spec, "never")  # this configuration's files: removed, as asked
    assert not list(spec.run_dir.rglob("*.*")) and not list(spec.checkpoint_dir.iterdir())
    assert not list(tmp_path.glob("ckpt.previous-*"))
    a_run(first, spec, 2, "AAAAA")
    keep_one_run(second, spec, "always")  # nothing to continue, nothing kept: untouched (loading says why)
    assert (spec.checkpoint_dir / "last.pt").exists()
    keep_one_run(second, spec, "never")  # another configuration's files: kept aside
    assert (aside_dir(spec, config_hash(first, spec)) / "run" / "metrics.json").read_text() == "AAAAA"
    keep_one_run(first, spec, "always")  # always takes a kept run of its configuration back
    assert (spec.run_dir / "metrics.json").read_text() == "AAAAA"


def test_files_no_checkpoint_names_and_an_unreadable_checkpoint(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "prepared", tmp_path)
    spec = RunSpec("vanilla", 0, tmp_path / "run", tmp_path / "ckpt")
    atomic_write_text(spec.run_dir / "metrics.json", "old")
    keep_one_run(config, spec, "auto")
    assert (aside_dir(spec, "unidentified") / "run" / "metrics.json").read_text() == "old"
    atomic_write_bytes(spec.checkpoint_dir / "last.pt", os.urandom(100))
    keep_one_run(config, spec, "auto")  # loading it will say it is corrupt and how to start over
    assert (spec.checkpoint_dir / "last.pt").exists()
    # this configuration's checkpoint in an older format, and a kept run of it: neither is lost
    atomic_torch_save({"format": CHECKPOINT_FORMAT - 1, "key": resume_key(config, spec), "epoch": 1},
                      spec.checkpoint_dir / "last.pt")
    atomic_write_text(aside_dir(spec, config_hash(config, spec)) / "last.pt", "kept")
    keep_one_run(config, spec, "auto")
    assert (aside_dir(spec, config_hash(config, spec)) / "last.pt").read_text() == "kept"
    assert torch.load(spec.checkpoint_dir / "last.pt", weights_only=True)["format"] == CHECKPOINT_FORMAT - 1


def test_the_divergence_advice_names_where_the_kept_run_goes(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "prepared", tmp_path)
    spec = RunSpec("vanilla", 0, tmp_path / "run", tmp_path / "ckpt")

    def diverging(config, spec, resume):
        raise DivergedError("training diverged at epoch 3 ... the last good checkpoint is kept")

    with pytest.raises(DivergedError) as error:
        exclusive(diverging)(config, spec)
    assert str(error.value).endswith(f"kept: a lower learning rate is another configuration, which moves this run "
                                     f"aside to {aside_dir(spec, config_hash(config, spec))}/ and starts over; going "
                                     f"back to this configuration resumes it")
    assert not (spec.checkpoint_dir / LOCK_NAME).exists()  # released on the error too


# ----------------------------------------------------------------------------------------------
# Unreadable files


def test_a_garbage_metrics_json_is_not_a_finished_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert finished_summary(tmp_path) is None and capsys.readouterr().out == ""
    for garbage, problem in ((b"\x00\xff{garbage", "is not JSON"), (b'["a", "list"]', "is not a run summary")):
        (tmp_path / "metrics.json").write_bytes(garbage)
        assert finished_summary(tmp_path) is None
        assert f"metrics.json {problem}" in capsys.readouterr().out
    (tmp_path / "metrics.json").write_text(json.dumps({"epochs": 2}))
    assert finished_summary(tmp_path) == {"epochs": 2}


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo PWNED",))


@pytest.mark.parametrize(("content", "verdict"), [
    (os.urandom(4096), "corrupt"),
    (b"cos\nsystem\n(S'echo PWNED'\ntR." + os.urandom(64), "corrupt"),  # reads as a GLOBAL opcode: not torch's
    (b"hello world\n" * 50, "corrupt"),  # a text file (was a raw KeyError)
    (b"", "corrupt"),
    ("crafted", "refused"),
    ("truncated", "corrupt"),
])
def test_random_bytes_are_corrupt_and_a_pickle_asking_for_code_is_refused(content: bytes | str, verdict: str,
                                                                          tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    if content == "crafted":
        torch.save({"model": _Payload()}, path)
    elif content == "truncated":
        torch.save({"model": torch.ones(1000)}, path)
        path.write_bytes(path.read_bytes()[:500])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as checkpoint_error:
        load_state(path, "checkpoint", "rerun with --resume never")
    with pytest.raises(PretrainedError) as teacher_error:
        read_checkpoint(path)
    for error, fix in ((checkpoint_error, "rerun with --resume never"), (teacher_error, "")):
        message = str(error.value)
        assert "\n" not in message and message.startswith(f"{path}: ")
        if verdict == "corrupt":
            assert "is corrupt or truncated" in message and "refused" not in message and message.endswith(
                fix or "download it again")
        else:
            assert "refused to load this checkpoint" in message and "GLOBAL posix.system" in message
    assert not (tmp_path / "PWNED").exists()


def test_a_missing_checkpoint_is_not_called_corrupt(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"absent\.pt: no such predictions file; rerun"):
        load_state(tmp_path / "absent.pt", "predictions file", "rerun")


@pytest.mark.slow  # imports the sweeps and Optuna: about 3 s alone
def test_a_stage_removes_what_killed_writes_left_in_its_folders(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import reproduce.train
    from pipeline.stage import run_stage
    from sweeps.study import RESULTS_ROOT

    monkeypatch.chdir(tmp_path)
    dead, abandoned = dead_pid(), []
    left = [killed_write(Path("dvclive") / "vanilla" / "metrics.json", dead, abandoned),
            killed_write(RESULTS_ROOT / "vanilla" / "not_swept.txt", dead, abandoned)]
    other_method = killed_write(Path("dvclive") / "kd" / "metrics.json", dead, abandoned)

    class Trained(Exception):
        pass

    def first_run(config, spec, **options):
        assert not any(path.exists() for path in left)  # gone before any training
        raise Trained

    monkeypatch.setattr(reproduce.train, "train", first_run)
    with pytest.raises(Trained):
        run_stage(tiny_config(tmp_path / "prepared", tmp_path), "vanilla", live_root=Path("dvclive"), track=False)
    assert other_method.exists()  # another stage's folder
