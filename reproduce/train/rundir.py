"""A run's two folders hold one run, written by one process.

``exclusive`` wraps ``train``: before anything is trained, the process (rank 0 under torchrun) takes the
run's lock (reproduce/train/lock.py), removes what killed writes left behind (reproduce/io.py) and keeps
the folders to one configuration:

* the folders hold a run of this configuration (the checkpoint's resume key matches): it continues;
* they hold another configuration's run (or files no readable checkpoint identifies): its files, from the
  checkpoint folder and the run folder, move aside together to ``<checkpoint_dir>.previous-<config hash>/``
  (the run folder's files under ``run/``), and this run starts from scratch. Going back to that
  configuration moves them back and resumes it. The aside copy lives under checkpoints/, next to the
  resumable state: DVC's outputs (runs/<method>/seed<k>/) keep their paths and only ever hold one run's
  files, and DVC neither caches nor deletes the copy. The hash is the runs' ``config_hash`` tag in MLflow
  and W&B;
* ``--resume never`` removes this configuration's files (that is what it asks for) and moves another
  configuration's aside as above; ``--resume always`` moves nothing but a kept run of this configuration
  back (no run to continue stays an error).

Under torchrun the other ranks read the checkpoint only after the process group starts, which waits for
rank 0, which has settled the folders by then.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from reproduce.config import Config
from reproduce.io import clean_temporaries
from reproduce.tracking import fingerprint
from reproduce.train.checkpoint import CheckpointError, continues, load_state, resume_key
from reproduce.train.lock import LOCK_NAME, run_lock
from reproduce.train.spec import RunSpec
from reproduce.train.step import DivergedError

UNREADABLE = object()  # a last.pt that does not load: loading it in the run says so, with the fix
UNIDENTIFIED = "unidentified"  # the aside name of files without a readable checkpoint to name their configuration
KEPT_RUN = "run"  # the run folder's files inside an aside folder

Train = TypeVar("Train", bound=Callable[..., dict[str, Any]])


def exclusive(train: Train) -> Train:
    """``train(config, spec, *, resume=..., ...)`` holding the run's lock, its folders one run's."""

    @functools.wraps(train)
    def exclusive_train(config: Config, spec: RunSpec, *, resume: str = "auto", **options: Any) -> dict[str, Any]:
        if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 writes the run's files (reproduce/runtime.py)
            return train(config, spec, resume=resume, **options)
        with run_lock(spec.checkpoint_dir, spec.run_dir):
            clean_temporaries(spec.run_dir, spec.checkpoint_dir)
            keep_one_run(config, spec, resume)
            try:
                return train(config, spec, resume=resume, **options)
            except DivergedError as error:
                raise DivergedError(f"{error}: a lower learning rate is another configuration, which moves this run "
                                    f"aside to {aside_dir(spec, config_hash(config, spec))}/ and starts over; going "
                                    f"back to this configuration resumes it") from error

    return exclusive_train  # type: ignore[return-value]


def config_hash(config: Config, spec: RunSpec) -> str:
    return fingerprint(resume_key(config, spec)["config"])


def aside_dir(spec: RunSpec, hash_: str) -> Path:
    return spec.checkpoint_dir.with_name(f"{spec.checkpoint_dir.name}.previous-{hash_}")


def keep_one_run(config: Config, spec: RunSpec, resume: str) -> None:
    """Settle the folders before the run reads them (see the module's docstring)."""
    state = _checkpoint(spec)
    readable = state is not None and state is not UNREADABLE
    if readable and resume != "never" and continues(state, config, spec):
        return
    own = config_hash(config, spec)
    if resume == "never":
        if readable and _recorded_hash(state) == own:
            _remove(_entries(spec))
            print(f"[reproduce] --resume never: removed this configuration's previous run from {spec.run_dir} and "
                  f"{spec.checkpoint_dir}", flush=True)
        else:
            _set_aside(spec, state)
        return
    if state is UNREADABLE or (readable and _recorded_hash(state) == own):
        return  # loading it says it is corrupt; or this configuration in an older format, which starts over
    kept = aside_dir(spec, own)
    if kept.is_dir():
        _set_aside(spec, state)
        _move_back(kept, spec)
        print(f"[reproduce] {spec.checkpoint_dir}: resuming this configuration's run (config {own}) from "
              f"{kept}/, where a configuration change had moved it", flush=True)
    elif resume == "auto":
        _set_aside(spec, state)


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """A finished run's metrics.json; None when it is absent or unreadable (the run writes it again from
    its checkpoint, with a line saying so)."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        problem = f"is not JSON ({str(error).splitlines()[0]})"
    else:
        if isinstance(summary, dict) and "epochs" in summary:
            return summary
        problem = "is not a run summary"
    print(f"[reproduce] {path} {problem}: writing it again from the finished checkpoint", flush=True)
    return None


def _checkpoint(spec: RunSpec) -> Any:
    """last.pt's content; None without one; ``UNREADABLE`` for a file that is not a checkpoint."""
    path = spec.checkpoint_dir / "last.pt"
    if not path.is_file():
        return None
    try:
        return load_state(path, "checkpoint", "delete it or rerun with --resume never")
    except CheckpointError:
        return UNREADABLE


def _recorded_hash(state: Any) -> str:
    key = state.get("key") if isinstance(state, dict) else None
    return fingerprint(key["config"]) if isinstance(key, dict) and "config" in key else UNIDENTIFIED


def _entries(spec: RunSpec) -> list[tuple[Path, Path]]:
    """(file or folder, where it goes inside an aside folder) for everything the run's folders hold."""
    checkpoint = [(entry, Path(entry.name)) for entry in _listing(spec.checkpoint_dir) if entry.name != LOCK_NAME]
    return checkpoint + [(entry, Path(KEPT_RUN) / entry.name) for entry in _listing(spec.run_dir)]


def _listing(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.is_dir() else []


def _set_aside(spec: RunSpec, state: Any) -> None:
    entries = _entries(spec)
    if not entries:
        return
    recorded = UNIDENTIFIED if state is None or state is UNREADABLE else _recorded_hash(state)
    target = aside_dir(spec, recorded)
    if target.exists():  # an older copy of the same configuration's run: this one supersedes it
        shutil.rmtree(target)
    for entry, inside in entries:
        (target / inside).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(entry, target / inside)
    epoch = f", epoch {state['epoch']}" if isinstance(state, dict) and "epoch" in state else ""
    if recorded == UNIDENTIFIED:
        what, back = "no readable checkpoint names its configuration", "nothing resumes it: delete it once read"
    else:
        what, back = f"config {recorded}{epoch}", "going back to that configuration resumes it"
    print(f"[reproduce] {spec.run_dir} and {spec.checkpoint_dir} held another run ({what}): moved it aside to "
          f"{target}/ ({back}); starting from scratch", flush=True)


def _move_back(kept: Path, spec: RunSpec) -> None:
    for entry in _listing(kept):
        if entry.name == KEPT_RUN and entry.is_dir():
            spec.run_dir.mkdir(parents=True, exist_ok=True)
            for inner in _listing(entry):
                shutil.move(inner, spec.run_dir / inner.name)
        else:
            spec.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            shutil.move(entry, spec.checkpoint_dir / entry.name)
    shutil.rmtree(kept)


def _remove(entries: list[tuple[Path, Path]]) -> None:
    for entry, _ in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
