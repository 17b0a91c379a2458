"""The run: epochs of steps, evaluation, the best epoch, checkpoints, exact resume.

Read ``train()`` at the bottom, top to bottom: it builds the run (``start``: data, method, one optimiser per
role, the learning rates, the DDP replicas), resumes from the checkpoint if there is one, then for every
epoch runs the steps (``train_epoch``), evaluates every network on validation and test (every
``recipe.eval_every`` epochs and always after the last), records the epoch and writes a checkpoint. Methods
only compute losses (reproduce/methods/base.py); one step is reproduce/train/step.py.

The host waits for the device once per epoch, not per step: the losses, signals and the check for a NaN
loss stay on the device until the epoch ends (reproduce/train/tally.py), evaluation returns its metrics in
one copy, and checkpoints are written by a background thread.

Honest reporting is built in: the best epoch is chosen on validation top-1 of the method's primary network
(never on test) among the evaluated epochs, and ``metrics.json`` holds the best and the last epoch side by side.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from reproduce.config import Config
from reproduce.data.loader import Batches, make_loaders
from reproduce.data.prepare import load_prepared
from reproduce.distributed import Replicas, make_replicas
from reproduce.io import atomic_torch_save, write_table
from reproduce.methods.base import Method, build_method
from reproduce.runtime import Runtime, resolve_runtime, seed_everything
from reproduce.tracking import Tracker, repair_finished_run, training_params
from reproduce.train.build import make_networks
from reproduce.train.checkpoint import (BackgroundWriter, checkpoint_state, host_copy, load_checkpoint, restore,
                                        save_networks)
from reproduce.train.compiled import CompiledStep, compile_networks
from reproduce.train.evaluate import Logits, evaluate, to_host
from reproduce.train.frozen import prepare_frozen
from reproduce.train.optim import LearningRates, make_optimizer
from reproduce.train.outputs import BEST_KEYS, epoch_bar, finish, report_epoch
from reproduce.train.rundir import config_hash, exclusive, finished_summary
from reproduce.train.spec import RunSpec
from reproduce.train.step import DivergedError, train_step
from reproduce.train.tally import EpochTally

EpochCallback = Callable[[int, dict[str, float]], None]


def train_epoch(method: Method, optimizers: dict[str, torch.optim.Optimizer], batches: Batches, epoch: int,
                rates: LearningRates, runtime: Runtime, *, replicas: Replicas | None = None,
                compiled: CompiledStep | None = None, progress: "tqdm | None" = None) -> EpochTally:
    """Every step of one epoch. Returns the epoch's tally, still on the device (``tally.result()`` reads it)."""
    method.train()
    tally = EpochTally(len(batches), runtime.device)
    # The epoch as a device tensor: methods compute with it, and a compiled step is not specialised on it.
    epoch_value = torch.full((), float(epoch), device=runtime.device)
    started = time.perf_counter()
    for index, (x, y) in enumerate(batches.epoch(epoch)):
        rates.apply(optimizers, epoch, index)
        tally.add(train_step(method, optimizers, x, y, epoch_value, runtime, replicas=replicas, compiled=compiled), index)
        tally.images += len(y)
        if progress is not None:
            progress.update(1)
            if index % 10 == 0:
                images_per_s = tally.images * runtime.world_size / max(time.perf_counter() - started, 1e-9)
                progress.set_postfix({"img/s": f"{images_per_s:.0f}"}, refresh=False)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)  # the kernels queued above are the epoch's real cost
    tally.seconds = time.perf_counter() - started
    return tally


def epoch_row(tally: EpochTally, method: Method, epoch: int, rates: LearningRates, runtime: Runtime) -> dict[str, float]:
    """The epoch's mean losses and signals, learning rates and timing (the epoch's one read of the device);
    ``DivergedError`` naming the first step, role and term that went NaN or infinite."""
    result = tally.result()
    if result.divergence is not None:
        bad = result.divergence
        raise DivergedError(f"training diverged at epoch {epoch}, step {bad.step}: method {method.name}, role "
                            f"{bad.role}, loss term {bad.term!r} is {bad.value}. Lower the learning rate "
                            f"(recipe.optimizer.lr or recipe.roles.{bad.role}.lr), or the method's coefficients; "
                            f"the last good checkpoint is kept")
    row = {"epoch": epoch, **result.means, **{f"lr/{role}": lr for role, lr in rates.last_of_epoch(epoch).items()}}
    row.update({"time/train_s": tally.seconds,
                "time/images_per_s": tally.images * runtime.world_size / max(tally.seconds, 1e-9)})
    return row


@dataclass
class Run:
    """What one run trains with, and how far it has come."""

    config: Config
    spec: RunSpec
    runtime: Runtime
    method: Method
    optimizers: dict[str, torch.optim.Optimizer]
    rates: LearningRates
    replicas: Replicas | None
    frozen: list[nn.Module]  # networks that never change: left out of checkpoints
    compiled: CompiledStep | None  # runtime.compile: the step's compiled parts
    evaluated_networks: dict[str, nn.Module]  # what evaluation runs (compiled copies with runtime.compile)
    train_batches: Batches
    eval_batches: dict[str, Batches]
    selection: str  # "val" or "test": where the best epoch is chosen
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "score": -math.inf})
    start_epoch: int = 1
    tracker_key: Any = None
    fixed_logits: Logits = field(default_factory=dict)  # of the frozen networks, computed once

    def evaluated(self, epoch: int) -> bool:
        return epoch % self.config.recipe.eval_every == 0 or epoch == self.config.recipe.epochs


def start(config: Config, spec: RunSpec) -> Run:
    """The run's runtime, data, method and optimisers, nothing trained yet."""
    runtime = resolve_runtime(config.runtime)
    if config.runtime.threads > 0:
        torch.set_num_threads(config.runtime.threads)
    seed_everything(spec.seed, config.runtime.deterministic)

    prepared = load_prepared(config.dataset.prepared_dir)
    train_batches, eval_batches = make_loaders(
        prepared, config.dataset, batch_size=config.recipe.batch_size, eval_batch_size=config.recipe.eval_batch_size,
        device=runtime.device, seed=spec.seed, channels_last=runtime.channels_last,
        num_workers=config.runtime.loader_workers, rank=runtime.rank, world_size=runtime.world_size,
        dtype=runtime.amp_dtype)
    method = build_method(config, spec.method, make_networks(config, prepared.num_classes, prepared.in_channels,
                                                             runtime.device))
    method.to(runtime.device)
    if runtime.channels_last:
        method.to(memory_format=torch.channels_last)
    frozen = prepare_frozen(method, runtime, next(iter(eval_batches.values())))  # folded and cast once, on a GPU
    optimizers = {role: make_optimizer(module, config.recipe.optimizer_for(role), runtime)
                  for role, module in method.roles().items()}
    compiled = CompiledStep(runtime) if runtime.compile else None
    evaluated_networks = (compile_networks(method.eval_networks(), runtime) if runtime.compile
                          else method.eval_networks())
    rates = LearningRates.for_recipe(config.recipe, list(optimizers), len(train_batches))
    # torchrun: the roles replicated over the ranks (reproduce/distributed.py); None in one process.
    replicas = make_replicas(method, runtime, sync_batchnorm=config.runtime.sync_batchnorm, quiet=config.runtime.quiet)
    # The papers' protocol trains on the whole training set and picks the best epoch on test; with a
    # validation split the best epoch is picked there. The two are reported under different names.
    selection = "val" if "val" in eval_batches else "test"
    return Run(config, spec, runtime, method, optimizers, rates, replicas, frozen, compiled, evaluated_networks,
               train_batches, eval_batches, selection)


def run_epoch(run: Run, epoch: int, tracker: Tracker, bar: "tqdm | None", writer: BackgroundWriter) -> dict[str, float]:
    """Train one epoch, evaluate it if it is due, record it and checkpoint it; returns its row."""
    tally = train_epoch(run.method, run.optimizers, run.train_batches, epoch, run.rates, run.runtime,
                        replicas=run.replicas, compiled=run.compiled, progress=bar)
    row = epoch_row(tally, run.method, epoch, run.rates, run.runtime)  # raises if the epoch diverged
    if run.replicas is not None:
        run.replicas.share_buffers()
    best_files = None
    if run.evaluated(epoch):
        metrics, logits, labels = evaluate(run.method, run.eval_batches, run.runtime, run.fixed_logits,
                                           run.evaluated_networks)
        row.update(metrics)
        score = row[f"{run.selection}/{run.method.primary}/top1"]
        if score > run.best["score"]:
            run.best = {"epoch": epoch, "score": score}
            best_files = {"logits": to_host(logits), "labels": host_copy(labels), "epoch": epoch}
    run.history.append(row)
    if run.runtime.is_main:
        write_table(run.spec.run_dir / "history.tsv", run.history)
        # The trackers get the epoch once its checkpoint is on disk: a killed run never leaves them an epoch
        # that its resume trains again (with other timings), and the resume re-sends what they lack.
        write_checkpoint(run, epoch, tracker.key, best_files, writer, then=lambda: tracker.log_epoch(row))
        report_epoch(bar, row, run.method, run.config)
    return row


def write_checkpoint(run: Run, epoch: int, tracker_key: Any, best_files: dict[str, Any] | None,
                     writer: BackgroundWriter, then: Callable[[], None]) -> None:
    """The epoch's files, copied to the host now and written by the background writer: best.pt and its
    predictions when the epoch is the best so far, then last.pt, then ``then()``."""
    state = checkpoint_state(config=run.config, spec=run.spec, epoch=epoch, method=run.method,
                             optimizers=run.optimizers, history=run.history, best=run.best, tracker_key=tracker_key,
                             frozen=run.frozen)
    best_networks = None if best_files is None else host_copy(
        {name: network.state_dict() for name, network in run.method.eval_networks().items()})
    directory = run.spec.checkpoint_dir

    def job() -> None:
        if best_networks is not None:
            save_networks(best_networks, run.config, directory / "best.pt", epoch)
            atomic_torch_save(best_files, directory / "best_predictions.pt")
        atomic_torch_save(state, directory / "last.pt")
        then()

    writer.submit(job)


@exclusive  # one process per run, one run per folder (reproduce/train/rundir.py)
def train(config: Config, spec: RunSpec, *, resume: str = "auto", stop_after_epoch: int | None = None,
          on_epoch_end: EpochCallback | None = None, track: bool = True, parent: Tracker | None = None) -> dict[str, Any]:
    """Train ``spec.method`` with ``spec.seed``; returns the summary written to metrics.json.

    ``on_epoch_end(epoch, row)`` sees every epoch's numbers (Optuna reports and prunes from it); an
    exception it raises ends the run, recorded by the trackers with the exception's
    ``tracking_status`` ("pruned") or as failed. ``stop_after_epoch`` ends the run after that epoch
    as a pre-emptible job would; the next call resumes from the checkpoint. ``parent``: a tracked run
    this one nests under (a sweep's study).
    """
    run = start(config, spec)
    state = load_checkpoint(spec, config, resume)
    if state is not None:
        summary = finished_summary(spec.run_dir) if state["epoch"] >= config.recipe.epochs else None
        if summary is not None:  # None: absent or unreadable, written again below from the checkpoint
            print(f"[reproduce] {spec.run_dir}: already done ({state['epoch']} epochs, same configuration); "
                  f"--resume never trains it again", flush=True)
            # a killed process or an outage may have kept the trackers from the end of the run
            repair_finished_run(state["tracker_key"], state["history"], summary, enabled=track and run.runtime.is_main)
            return summary
        restore(state, run.method, run.optimizers, run.frozen, spec.checkpoint_dir / "last.pt")
        run.history, run.best, run.tracker_key = state["history"], state["best"], state["tracker_key"]
        run.start_epoch = state["epoch"] + 1
    tags = {"method": spec.method, "seed": str(spec.seed), "dataset": config.dataset.name,
            "teacher": config.models.teacher, "student": config.models.student, "selection": run.selection}
    tracker = Tracker(config.tracking, run_dir=spec.run_dir, run_name=spec.name,
                      tags={**tags, "config_hash": config_hash(config, spec)},
                      params=training_params(config, spec.method, tags), resume_key=run.tracker_key,
                      enabled=track and run.runtime.is_main, parent=parent, history=run.history)
    if run.history and run.runtime.is_main:  # resumed: DVC may have deleted the interrupted run's outputs
        write_table(spec.run_dir / "history.tsv", run.history)
    bar = epoch_bar(config, run.runtime, spec, run.start_epoch, len(run.train_batches))
    writer = BackgroundWriter()
    try:
        for epoch in range(run.start_epoch, config.recipe.epochs + 1):
            row = run_epoch(run, epoch, tracker, bar, writer)
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
            if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch < config.recipe.epochs:
                writer.wait()
                tracker.suspend()
                return {"stopped_after_epoch": epoch}
        writer.wait()  # finish reads best.pt
        summary = finish(run.method, config, spec, tracker, run.eval_batches, run.runtime, run.history, run.best,
                         BEST_KEYS[run.selection], run.evaluated_networks)
    except BaseException as error:
        writer.wait(raise_error=False)  # the last good checkpoint is whole on disk before the run ends
        tracker.finish({}, status=getattr(error, "tracking_status", "failed"))
        raise
    finally:
        if bar is not None:
            bar.close()
    return summary
