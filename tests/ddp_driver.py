"""``python -m reproduce`` for tests/test_ddp.py, run directly or under torchrun, that also records what each
rank did into ``<record dir>/rank<r>.json``:

- ``batches``: per epoch, per training batch, a fingerprint of every sample (its augmented pixels and label);
- ``writes``: every file this rank opened for writing, or moved into place, under the working directory;
- ``tracker_enabled``: whether this rank's Tracker was asked to track;
- ``updates``, ``signals``, ``digests``: per training step, the roles updated (named in ``Step.update`` and not
  gated off by ``Step.gates``), the method's signals and a
  digest of every role's parameters after the step; ``ddp_roles``: the roles whose gradients the step's
  ``replicas`` handle averages (reproduce/distributed.py);
and every role's parameters before and after the first step into ``<record dir>/rank<r>_step1.pt``.

``DDP_TEST_FAULT=<kind>:<rank>:<step>`` makes that rank misbehave at that training step (counted from 1):
``stall`` stops answering (sleeps), ``exit`` leaves with status 0, ``disagree`` asks to update the student
only while the other ranks update every role.

Usage: ``ddp_driver.py RECORD_DIR train --method M ...`` (the arguments after RECORD_DIR are the CLI's).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

RANK = int(os.environ.get("RANK", "0"))
ROOT = Path.cwd().resolve()
record: dict = {"rank": RANK, "batches": {}, "writes": [], "tracker_enabled": None, "updates": [], "signals": [],
                "digests": []}
auditing = True


def _audit(event: str, args: tuple) -> None:
    if not auditing:
        return
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    elif event in ("os.rename", "os.replace"):
        path, writing = args[1], True
    else:
        return
    if writing and isinstance(path, (str, bytes, os.PathLike)):
        resolved = Path(os.fsdecode(path)).resolve()
        if resolved.is_relative_to(ROOT):
            record["writes"].append(str(resolved.relative_to(ROOT)))


def _instrument() -> None:
    import torch

    import reproduce.train.loop as engine
    from reproduce.data.loader import DeviceLoader

    epoch = DeviceLoader.epoch

    def recorded_epoch(self: DeviceLoader, n: int):
        batches = record["batches"].setdefault(str(n), []) if self.train else None
        for x, y in epoch(self, n):
            if batches is not None:
                rows = torch.round(x.detach().float().cpu().flatten(1) * 1e4).to(torch.int64).numpy()
                batches.append([hashlib.sha1(row.tobytes() + bytes([int(label)])).hexdigest()[:16]
                                for row, label in zip(rows, y.tolist())])
            yield x, y

    DeviceLoader.epoch = recorded_epoch

    tracker_class = engine.Tracker

    def tracker(config, **kwargs):
        record["tracker_enabled"] = bool(kwargs.get("enabled", True))
        return tracker_class(config, **kwargs)

    engine.Tracker = tracker

    fault = os.environ.get("DDP_TEST_FAULT", "")
    kind, fault_rank, fault_step = (fault.split(":")[0], *map(int, fault.split(":")[1:])) if fault else ("", -1, -1)
    train_step = engine.train_step

    def recording_train_step(method, optimizers, *args, **kwargs):
        if RANK == fault_rank and len(record["updates"]) + 1 == fault_step:
            if kind == "stall":
                print(f"[ddp_driver] rank {RANK} stops answering before step {fault_step}", flush=True)
                time.sleep(600)
            if kind == "exit":
                print(f"[ddp_driver] rank {RANK} leaves before step {fault_step}", flush=True)
                os._exit(0)
            if kind == "disagree":
                return _updating_the_student_only(train_step, method, optimizers, *args, **kwargs)
        if not record["updates"]:
            first_step["before"] = _flat(method)
        step = train_step(method, optimizers, *args, **kwargs)
        roles = sorted(step.update) if step.update is not None else sorted(optimizers)
        record["updates"].append([role for role in roles if role not in step.gates or bool(step.gates[role])])
        record["signals"].append({name: float(value) for name, value in step.signals.items()})
        record["digests"].append({role: _digest(module) for role, module in method.roles().items()})
        if len(record["updates"]) == 1:
            first_step["after"] = _flat(method)
        replicas = kwargs.get("replicas")
        record["ddp_roles"] = list(replicas.names) if replicas is not None else []
        return step

    engine.train_step = recording_train_step


def _updating_the_student_only(train_step, method, optimizers, *args, **kwargs):
    """One step in which this rank alone asks to update the student only (a rank-local decision)."""
    own_step = method.step

    def step(x, y, epoch):
        result = own_step(x, y, epoch)
        result.update = frozenset({"student"})
        return result

    method.step = step
    try:
        return train_step(method, optimizers, *args, **kwargs)
    finally:
        del method.step


first_step: dict = {}  # every role's parameters before and after the first step


def _flat(method) -> dict:
    import torch

    return {role: torch.cat([p.detach().flatten().cpu() for p in module.parameters()]).clone()
            for role, module in method.roles().items()}


def _digest(module) -> str:
    import torch

    with torch.no_grad():
        flat = torch.cat([p.detach().flatten().cpu() for p in module.parameters()])
    return hashlib.sha1(flat.numpy().tobytes()).hexdigest()[:16]


def main() -> int:
    global auditing
    out = Path(sys.argv[1])
    sys.addaudithook(_audit)
    _instrument()
    from reproduce.__main__ import main as cli

    try:
        return cli(sys.argv[2:])
    finally:
        auditing = False
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{RANK}.json").write_text(json.dumps(record))
        if first_step:
            import torch

            torch.save(first_step, out / f"rank{RANK}_step1.pt")


if __name__ == "__main__":
    sys.exit(main())
