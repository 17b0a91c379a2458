"""Read back what a W&B run recorded on disk (an offline run before ``wandb sync``, or the local log of
an online one): the W&B backend learns from it which steps a killed process delivered, and tests read
runs back with it. wandb ships the record schema but no reader."""

from __future__ import annotations

import json
import re
import struct
import time
from pathlib import Path
from typing import Any

BLOCK = 32768  # the log's block size
HEADER = 7  # a record's header: 4-byte CRC, 2-byte length, 1-byte kind (1 full, 2 first, 3 middle, 4 last)
FILE_HEADER = 7


def part_suffix() -> str:
    """The end of a run part's folder name: W&B names a part's folder by the second it started, so two
    parts of one run started within a second (a repair right after a failure) would share one."""
    return f"{time.time_ns() // 1_000_000 % 1000:03d}"


def offline_parts(wandb_dir: Path, key: str) -> list[Path]:
    """The folders of run ``key``'s offline parts (``offline-run-<time>-<key>[-<ms>]``), oldest first."""
    name = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(key)}(-\d{{3}})?")
    return sorted(path for path in Path(wandb_dir).glob("offline-run-*") if name.fullmatch(path.name)
                  and any(path.glob("run-*.wandb")))


def read_wandb_offline_run(run_dir: Path) -> dict[str, Any]:
    """Config, history rows, summary, group, job type and logged artefact names of one W&B run folder
    (``wandb/offline-run-<time>-<id>``); ``exit_code`` once the run finished, ``preempted`` if it was
    suspended. The ``run-<id>.wandb`` file is a LevelDB-style log of protobuf ``Record`` messages in
    32 KiB blocks (zeros pad a block's end). A process killed mid-write leaves a torn last record: the
    reader stops there, so what it returns is what ``wandb sync`` would upload."""
    from wandb.proto import wandb_internal_pb2

    (log_file,) = Path(run_dir).glob("run-*.wandb")
    result: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "artifacts": []}
    for payload in _records(log_file.read_bytes()):
        try:
            record = wandb_internal_pb2.Record.FromString(payload)
        except Exception:  # noqa: BLE001  (protobuf's DecodeError: a torn record, the end of what was written)
            break
        which = record.WhichOneof("record_type")
        if which == "run":
            result.update(group=record.run.run_group, job_type=record.run.job_type)
            result["config"].update({k: v.get("value", v) if isinstance(v, dict) else v
                                     for k, v in _items(record.run.config.update).items()})
        elif which == "config":
            result["config"].update({k: v.get("value", v) if isinstance(v, dict) else v
                                     for k, v in _items(record.config.update).items()})
        elif which == "history":
            result["history"].append(_items(record.history.item))
        elif which == "summary":
            result["summary"].update(_items(record.summary.update))
        elif which == "artifact":
            result["artifacts"].append(record.artifact.name)
        elif which == "preempting":
            result["preempted"] = True
        elif which == "exit":
            result["exit_code"] = record.exit.exit_code
    return result


def _items(items: Any) -> dict[str, Any]:
    return {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in items}


def _records(data: bytes):
    """The payload of every complete record, in order; stops at the first incomplete one."""
    position, pending = FILE_HEADER, b""
    while position + HEADER <= len(data):
        if BLOCK - position % BLOCK < HEADER:  # too little of the block left for a header: its padding
            position += BLOCK - position % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + HEADER])
        if kind == 0 or position + HEADER + length > len(data):  # zero padding, or a record cut short
            return
        pending, position = pending + data[position + HEADER:position + HEADER + length], position + HEADER + length
        if kind in (1, 4):
            yield pending
            pending = b""
