"""The run: epochs of steps, evaluation, the best epoch, checkpoints, exact resume.

Read ``train()`` top to bottom: it builds the data, the method and one optimiser per role, then for
every epoch runs the steps (``train_epoch``), evaluates every network on validation and test,
records the epoch and writes a checkpoint. Methods only compute losses (reproduce/methods/base.py);
one step is reproduce/train/step.py.

Honest reporting is built in: every epoch is evaluated on both splits, the best epoch is chosen on
validation top-1 of the method's primary network (never on test), and ``metrics.json`` holds the
best and the last epoch side by side.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from reproduce.config import Config, ConfigError
from reproduce.data.loader import Batches, make_loaders
from reproduce.data.prepare import load_prepared
from reproduce.distributed import Replicas, make_replicas
from reproduce.io import atomic_torch_save, write_table
from reproduce.methods.base import Method, build_method, get_method
from reproduce.runtime import Runtime, resolve_runtime, seed_everything
from reproduce.tracking import Tracker, git_commit
from reproduce.train.build import make_networks
from reproduce.train.checkpoint import load_checkpoint, restore, save_checkpoint, save_networks
from reproduce.train.evaluate import evaluate
from reproduce.train.optim import make_optimizer, set_learning_rates
from reproduce.train.outputs import BEST_KEYS, epoch_bar, finish, report_epoch
from reproduce.train.spec import RunSpec
from reproduce.train.step import train_step

EpochCallback = Callable[[int, dict[str, float]], None]


def train_epoch(method: Method, optimizers: dict[str, torch.optim.Optimizer], batches: Batches, epoch: int,
                config: Config, runtime: Runtime, progress: "tqdm | None" = None,
                replicas: Replicas | None = None) -> dict[str, float]:
    """Every step of one epoch; returns the epoch's mean losses and signals, learning rates and timing."""
    method.train()
    sums: dict[str, Tensor | float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    steps = len(batches)
    images = 0
    started = time.perf_counter()
    for index, (x, y) in enumerate(batches.epoch(epoch)):
        set_learning_rates(optimizers, config.recipe, epoch, index / steps)
        step = train_step(method, optimizers, x, y, epoch, runtime, index, replicas=replicas)
        # Accumulate on the device; converting to Python floats every step would sync a GPU.
        for role, terms in step.losses.items():
            for term, value in terms.items():
                _accumulate(sums, counts, f"train/{role}/loss_{term}", value.detach())
            _accumulate(sums, counts, f"train/{role}/loss", sum(t.detach() for t in terms.values()))
        for signal, value in step.signals.items():
            _accumulate(sums, counts, f"signal/{signal}", value)
        images += len(y)
        if progress is not None:
            progress.update(1)
            if index % 10 == 0 or index == steps - 1:
                elapsed = time.perf_counter() - started
                progress.set_postfix({"img/s": f"{images * runtime.world_size / max(elapsed, 1e-9):.0f}",
                                      **{k.split("/")[1]: f"{float(sums[k]) / counts[k]:.3f}"
                                         for k in sums if k.endswith("/loss")}}, refresh=False)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)  # the kernels queued above are the epoch's real cost
    seconds = time.perf_counter() - started
    row = {key: float(sums[key]) / counts[key] for key in sums}
    row.update({f"lr/{role}": optimizer.param_groups[0]["lr"] for role, optimizer in optimizers.items()})
    row.update({"time/train_s": seconds, "time/images_per_s": images * runtime.world_size / max(seconds, 1e-9)})
    return row


def _accumulate(sums: dict[str, Any], counts: dict[str, int], key: str, value: Tensor | float) -> None:
    sums[key] = sums[key] + (value.detach().float() if torch.is_tensor(value) else value)
    counts[key] += 1


def train(config: Config, spec: RunSpec, *, resume: str = "auto", stop_after_epoch: int | None = None,
          on_epoch_end: EpochCallback | None = None, track: bool = True, parent: Tracker | None = None) -> dict[str, Any]:
    """Train ``spec.method`` with ``spec.seed``; returns the summary written to metrics.json.

    ``on_epoch_end(epoch, row)`` sees every epoch's numbers (Optuna reports and prunes from it); an
    exception it raises ends the run, recorded by the trackers with the exception's
    ``tracking_status`` ("pruned") or as failed. ``stop_after_epoch`` ends the run after that epoch
    as a pre-emptible job would; the next call resumes from the checkpoint. ``parent``: a tracked run
    this one nests under (a sweep's study).
    """
    runtime = resolve_runtime(config.runtime)
    if config.runtime.threads > 0:
        torch.set_num_threads(config.runtime.threads)
    seed_everything(spec.seed, config.runtime.deterministic)
    method_cls = get_method(spec.method)
    method_cls.parse_params(config.methods.get(spec.method))  # fail on a bad coefficient before any I/O

    prepared = load_prepared(config.dataset.prepared_dir)
    train_batches, eval_batches = make_loaders(
        prepared, config.dataset, batch_size=config.recipe.batch_size, eval_batch_size=config.recipe.eval_batch_size,
        device=runtime.device, seed=spec.seed, channels_last=runtime.channels_last,
        num_workers=config.runtime.num_workers, rank=runtime.rank, world_size=runtime.world_size)
    # The papers' protocol trains on the whole training set and picks the best epoch on test; with a
    # validation split the best epoch is picked there. The two are reported under different names.
    selection = "val" if "val" in eval_batches else "test"
    best_key = BEST_KEYS[selection]

    method = build_method(config, spec.method, make_networks(config, prepared.num_classes, prepared.in_channels,
                                                             runtime.device))
    method.to(runtime.device)
    if runtime.channels_last:
        method.to(memory_format=torch.channels_last)
    optimizers = {role: make_optimizer(module, config.recipe.optimizer_for(role))
                  for role, module in method.roles().items()}
    # torchrun: the roles replicated over the ranks (reproduce/distributed.py); None in one process.
    replicas = make_replicas(method, runtime, sync_batchnorm=config.runtime.sync_batchnorm, quiet=config.runtime.quiet)

    state = load_checkpoint(spec, config, resume)
    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"epoch": 0, "score": -math.inf}
    start_epoch, tracker_key = 1, None
    if state is not None:
        if state["epoch"] >= config.recipe.epochs and (spec.run_dir / "metrics.json").is_file():
            print(f"[reproduce] {spec.run_dir}: already done ({state['epoch']} epochs, same configuration); "
                  f"--resume never trains it again", flush=True)
            return json.loads((spec.run_dir / "metrics.json").read_text())
        restore(state, method, optimizers)
        history, best, tracker_key = state["history"], state["best"], state["tracker_key"]
        start_epoch = state["epoch"] + 1
    if runtime.compile:
        for network in method.eval_networks().values():
            network.compile()

    tags = {"method": spec.method, "seed": str(spec.seed), "dataset": config.dataset.name,
            "teacher": config.models.teacher, "student": config.models.student, "selection": selection}
    tracker = Tracker(config.tracking, run_dir=spec.run_dir, run_name=spec.name, tags=tags,
                      params={**config.to_dict(), "run": {**tags, **git_commit()}}, resume_key=tracker_key,
                      enabled=track and runtime.is_main, parent=parent)
    if history and runtime.is_main:  # resumed: DVC may have deleted the interrupted run's outputs
        write_table(spec.run_dir / "history.tsv", history)
    primary_score = f"{selection}/{method.primary}/top1"
    bar = epoch_bar(config, runtime, spec, start_epoch, len(train_batches))

    fixed_logits: dict[str, dict[str, Tensor]] = {}
    try:
        for epoch in range(start_epoch, config.recipe.epochs + 1):
            row: dict[str, float] = {"epoch": epoch}
            row.update(train_epoch(method, optimizers, train_batches, epoch, config, runtime, bar, replicas))
            if replicas is not None:
                replicas.share_buffers()
            metrics, logits, labels = evaluate(method, eval_batches, runtime, fixed_logits)
            row.update(metrics)
            history.append(row)
            if row[primary_score] > best["score"]:
                best = {"epoch": epoch, "score": row[primary_score]}
                if runtime.is_main:
                    save_networks(method, config, spec.checkpoint_dir / "best.pt", epoch)
                    atomic_torch_save({"logits": logits, "labels": labels, "epoch": epoch},
                                      spec.checkpoint_dir / "best_predictions.pt")
            tracker.log_epoch(row)
            if runtime.is_main:
                write_table(spec.run_dir / "history.tsv", history)
                save_checkpoint(spec.checkpoint_dir / "last.pt", config=config, spec=spec, epoch=epoch, method=method,
                                optimizers=optimizers, history=history, best=best, tracker_key=tracker.key)
                report_epoch(bar, row, method, config)
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
            if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch < config.recipe.epochs:
                tracker.suspend()
                return {"stopped_after_epoch": epoch}
        if not history:
            raise ConfigError("recipe.epochs must be at least 1")
        summary = finish(method, config, spec, tracker, eval_batches, runtime, history, best, best_key)
    except BaseException as error:
        tracker.finish({}, status=getattr(error, "tracking_status", "failed"))
        raise
    finally:
        if bar is not None:
            bar.close()
    return summary
