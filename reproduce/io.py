"""Every file the suite writes goes through here, atomically: the content goes to a temporary sibling,
is flushed to the disk, then replaces the file in one rename. A reader, or a run killed at any moment,
sees the previous file or the new one, never half of one; a full disk (or quota) leaves the previous file
whole and ends the command with one line naming the file and the fix (``DiskFullError``, exit code 2).

A killed write leaves its temporary sibling behind, named ``.<name>.<pid>-<random>.tmp`` after the
writing process; ``clean_temporaries`` removes those whose process is gone, at the next start of a run
or a stage, in the folders that run or stage owns (a write in progress keeps its file)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from reproduce.errors import UserError

# mkstemp's names with our prefix and suffix: ".<name>.<pid>-" + 8 characters of [a-z0-9_] + ".tmp"
TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[a-z0-9_]{8}\.tmp$")
FULL_DISK = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded"}


class DiskFullError(UserError):
    """A write failed for lack of space: the previous file is intact; free space or write elsewhere."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once: setting the umask to read it is not thread-safe, and checkpoints are written by a thread.
_UMASK = _umask()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it replaces ``path`` in one rename.
    Any failure removes the temporary file and leaves ``path`` as it was."""
    path = Path(path)
    temporary: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp")
        os.close(handle)
        temporary = Path(name)
        os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes owner-only files; results are meant to be shared
        yield temporary
        _flush_to_disk(temporary)  # a full disk or a network file system may report the failure only here
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        reason = disk_full_reason(error)
        if reason is not None:
            raise DiskFullError(f"{path}: {reason} while writing it; the previous {path.name}, if any, is intact. "
                                f"Free space on that disk (df -h {path.parent}) or point the output elsewhere, "
                                f"then rerun the same command") from None
        raise


def _flush_to_disk(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def disk_full_reason(error: BaseException) -> str | None:
    """"no space left on the device" (or the quota's) when ``error`` or an error it wraps is one: torch
    reports a failed write as a RuntimeError whose context holds the OSError."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in FULL_DISK:
            return FULL_DISK[current.errno]
        current = current.__cause__ or current.__context__
    return None


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def atomic_copy(source: Path, target: Path) -> None:
    """``target`` becomes a copy of ``source`` (best.pt from the checkpoint folder into the run folder)."""
    with atomic_path(target) as temporary:
        shutil.copyfile(source, temporary)


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch  # here, not at the top: the tracking service process never loads torch

    # Through a Python file: torch's own writer turns a full disk into an iostream error without the errno.
    with atomic_path(path) as temporary, temporary.open("wb") as stream:
        torch.save(obj, stream)


def atomic_savefig(figure: Any, path: Path, **options: Any) -> None:
    """``figure.savefig(path)`` (matplotlib), atomically; the format follows ``path``'s suffix."""
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format=options.pop("format", path.suffix.lstrip(".")), **options)


def process_running(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_temporaries(*directories: Path, quiet: bool = False) -> list[Path]:
    """Remove the temporary files that killed writes left under ``directories`` (recursively): only the
    names ``atomic_path`` makes, only those whose writing process is gone. Returns what it removed."""
    removed: list[Path] = []
    size = 0
    for directory in directories:
        for folder, _, names in os.walk(directory):
            for name in names:
                match = TEMPORARY.match(name)
                if match is None or process_running(int(match["pid"])):
                    continue
                path = Path(folder) / name
                try:
                    size += path.stat().st_size
                    path.unlink()
                except FileNotFoundError:  # another cleaner got it first
                    continue
                removed.append(path)
    if removed and not quiet:
        where = ", ".join(str(directory) for directory in directories)
        print(f"[reproduce] removed {len(removed)} temporary file{'s' * (len(removed) > 1)} of interrupted writes "
              f"({size / 2**20:.1f} MiB) under {where}", flush=True)
    return removed


def write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows as a TSV (a column per key, in order of first appearance; blank where a row lacks it):
    a run's ``history.tsv`` holds every number of every epoch."""
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    lines = ["\t".join(columns)] + ["\t".join(_cell(row.get(column)) for column in columns) for row in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
