"""The training loop: one optimiser per role, schedules, AMP, evaluation, checkpoints, exact resume.

Read ``train()`` top to bottom: it builds the data, the method and one optimiser per role, then for
every epoch runs the steps (``_train_epoch``), evaluates every network on validation and test,
records the epoch and writes a checkpoint. Methods only compute losses (reproduce/methods/base.py).

Honest reporting is built in: every epoch is evaluated on both splits, the best epoch is chosen on
validation top-1 of the method's primary network (never on test), and ``metrics.json`` holds the
best and the last epoch side by side.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pickle
import platform
import random
import sys
import tarfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from reproduce import distributed, models
from reproduce.config import Config, ConfigError, OptimizerConfig, RecipeConfig, RuntimeConfig, ScheduleConfig
from reproduce.data.loader import Batches, make_loaders
from reproduce.data.prepare import load_prepared
from reproduce.io import atomic_torch_save, atomic_write_text, write_table
from reproduce.methods.base import Method, Networks, Step, build_method, get_method
from reproduce.metrics import classification_metrics
from reproduce.tracking import Tracker, git_commit

CHECKPOINT_FORMAT = 3  # 3: loadable with weights_only=True
EpochCallback = Callable[[int, dict[str, float]], None]


# ----------------------------------------------------------------------------------------------
# Run identity and runtime


@dataclass(frozen=True)
class RunSpec:
    method: str
    seed: int
    run_dir: Path  # outputs DVC tracks: metrics.json, history.tsv, final.pt, best.pt, predictions.pt
    checkpoint_dir: Path  # the rolling full-state checkpoint; outside DVC's outputs so a killed run resumes

    @property
    def name(self) -> str:
        return f"{self.run_dir.parent.name}-{self.run_dir.name}"

    @classmethod
    def default(cls, method: str, seed: int, label: str | None = None, runs_root: str = "runs",
                checkpoints_root: str = "checkpoints") -> "RunSpec":
        label = label or method
        return cls(method, seed, Path(runs_root) / label / f"seed{seed}", Path(checkpoints_root) / label / f"seed{seed}")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    compile: bool
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_runtime(config: RuntimeConfig) -> Runtime:
    """Turn the "auto" settings into concrete ones for this machine (and this DDP rank)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if config.device == "auto":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device: CUDA was requested but is not available; use runtime.device=auto or cpu")
    cuda = device.type == "cuda"
    # bf16 autocast is ~30x slower than fp32 on CPU: never an automatic choice there.
    amp = {"auto": torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None,
           "bf16": torch.bfloat16, "off": None}
    switches = {"auto": cuda, "on": True, "off": False}
    for key, value, allowed in (("amp", config.amp, amp), ("channels_last", config.channels_last, switches),
                                ("compile", config.compile, switches)):
        if value not in allowed:
            raise ConfigError(f"runtime.{key}: {value!r} is not one of {', '.join(allowed)}")
    if world_size > 1:
        if cuda and device.index is None:  # runtime.device=cuda under torchrun: this rank's GPU, not GPU 0
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        distributed.init_process_group(device, config.ddp_timeout_s)
    return Runtime(device, amp[config.amp], switches[config.channels_last], switches[config.compile], rank, world_size)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


# ----------------------------------------------------------------------------------------------
# Optimisers and learning-rate schedules


def make_optimizer(module: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, nesterov=config.nesterov)
    if config.name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    raise ConfigError(f"recipe.optimizer.name: {config.name!r} is not one of sgd, adamw")


def learning_rate(base_lr: float, schedule: ScheduleConfig, epochs: int, epoch: int, fraction: float) -> float:
    """LR during ``epoch`` (from 1), ``fraction`` of the way through it: a pure function of progress,
    so resuming needs no scheduler state. Step decay follows CRD (×gamma once epoch > milestone)."""
    progress = epoch - 1 + fraction  # epochs completed
    if schedule.name == "step":
        factor = schedule.gamma ** sum(epoch > milestone for milestone in schedule.milestones)
    elif schedule.name == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * progress / epochs))
    else:
        raise ConfigError(f"recipe.schedule.name: {schedule.name!r} is not one of step, cosine")
    if progress < schedule.warmup_epochs:
        factor *= progress / schedule.warmup_epochs
    return base_lr * factor


# ----------------------------------------------------------------------------------------------
# Building the method


def make_networks(config: Config, num_classes: int, in_channels: int, device: torch.device) -> Networks:
    def create(arch: str) -> nn.Module:
        return models.create(arch, num_classes, in_channels=in_channels)

    def load_teacher() -> nn.Module:
        path = config.teacher.weights
        if not path.exists():
            raise FileNotFoundError(
                f"teacher weights not found at {path}. Offline methods distil from the trained teacher: run "
                f"`dvc repro train@teacher` (or `python -m reproduce stage --method teacher`) first, or point "
                f"teacher.runs_root at a folder holding seed{config.teacher.seed}/final.pt.")
        saved = load_state(path, "teacher checkpoint", "retrain the teacher (`dvc repro train@teacher`) or point "
                                                       "teacher.runs_root at a good one")
        if saved["models"]["teacher"] != config.models.teacher:
            raise ConfigError(f"{path} holds a {saved['models']['teacher']!r} teacher but models.teacher is "
                              f"{config.models.teacher!r}; retrain the teacher or fix models.teacher")
        teacher = create(config.models.teacher)
        teacher.load_state_dict(saved["networks"]["teacher"])
        teacher.requires_grad_(False)
        return teacher.eval()

    return Networks(config.models.teacher, config.models.student, num_classes, in_channels, create, load_teacher)


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def predict(networks: dict[str, nn.Module], batches: Batches, amp_dtype: torch.dtype | None,
            device: torch.device) -> tuple[dict[str, Tensor], Tensor]:
    """Logits of every network on one split (one pass over the data), and the labels."""
    outputs: dict[str, list[Tensor]] = defaultdict(list)
    labels = []
    for x, y in batches.epoch(0):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            for name, network in networks.items():
                outputs[name].append(network(x).float().cpu())
        labels.append(y.cpu())
    return {name: torch.cat(chunks) for name, chunks in outputs.items()}, torch.cat(labels)


def evaluate(method: Method, splits: dict[str, Batches], runtime: Runtime,
             fixed_logits: dict[str, dict[str, Tensor]] | None = None,
             ) -> tuple[dict[str, float], dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """Metrics ``{split}/{network}/{metric}`` for every evaluated network, plus the raw logits.

    ``fixed_logits``, kept by the caller between epochs, holds the logits of the networks that cannot
    change (frozen and without a trainable parameter, like a pre-trained teacher): those are computed
    on the first call only."""
    method.eval()
    networks = method.eval_networks()
    frozen = {id(module) for module in method.frozen()}
    fixed = [name for name, network in networks.items()
             if id(network) in frozen and not any(p.requires_grad for p in network.parameters())]
    metrics: dict[str, float] = {}
    logits: dict[str, dict[str, Tensor]] = {}
    labels: dict[str, Tensor] = {}
    for split, batches in splits.items():
        known = fixed_logits.get(split, {}) if fixed_logits is not None else {}
        computed, labels[split] = predict({name: network for name, network in networks.items() if name not in known},
                                          batches, runtime.amp_dtype, runtime.device)
        logits[split] = {name: known[name] if name in known else computed[name] for name in networks}
        if fixed_logits is not None:
            fixed_logits[split] = {name: logits[split][name] for name in fixed}
        for network, values in logits[split].items():
            for metric, value in classification_metrics(values, labels[split]).items():
                metrics[f"{split}/{network}/{metric}"] = value
    return metrics, logits, labels


# ----------------------------------------------------------------------------------------------
# One epoch of training


class DivergedError(RuntimeError):
    """A loss became NaN or infinite: training stops at once (the last good checkpoint stays)."""


def set_learning_rates(optimizers: dict[str, torch.optim.Optimizer], recipe: RecipeConfig, epoch: int,
                       fraction: float) -> None:
    for role, optimizer in optimizers.items():
        lr = learning_rate(recipe.optimizer_for(role).lr, recipe.schedule, recipe.epochs, epoch, fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr


def train_step(method: Method, optimizers: dict[str, torch.optim.Optimizer], x: Tensor, y: Tensor, epoch: int,
               runtime: Runtime, index: int | None = None) -> Step:
    """One optimisation step, top to bottom: the method's losses, one backward, the updated roles step.

    Every peer target is detached inside the losses, so the sum of the updated roles' losses has
    gradients only in their own parameters; a role left out of ``step.update`` gets no gradient, no
    momentum and no weight decay. ``index`` (the step within the epoch) only names the step in errors."""
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    with torch.autocast(runtime.device.type, dtype=runtime.amp_dtype or torch.float32,
                        enabled=runtime.amp_dtype is not None):
        with distributed.role_wrappers(method):  # under DDP the forward arms each role's gradient all-reduce
            step = method.step(x, y, epoch)
    _check_finite(step, method, epoch, index)
    update = _roles_to_update(step.update, optimizers, runtime)
    total = sum(sum(step.losses[role].values()) for role in update if role in step.losses)
    if torch.is_tensor(total):  # zero when no role trains this step
        total.backward()
    if runtime.world_size > 1:
        distributed.after_backward(method, update)  # the roles DDP could not reduce during the backward
    for role in update:
        optimizers[role].step()
    return step


def _check_finite(step: Step, method: Method, epoch: int, index: int | None) -> None:
    terms = [(role, term, value) for role, losses in step.losses.items() for term, value in losses.items()]
    if not terms:
        return
    # One host sync per step: the price of stopping at the step that diverged, before it is applied.
    if bool(torch.stack([value.detach().float() for _, _, value in terms]).isfinite().all()):
        return
    role, term, value = next((r, t, v) for r, t, v in terms if not bool(v.detach().float().isfinite()))
    where = f"epoch {epoch}" + (f", step {index + 1}" if index is not None else "")
    raise DivergedError(f"training diverged at {where}: method {method.name}, role {role}, loss term {term!r} is "
                        f"{float(value.detach())}. Lower the learning rate (recipe.optimizer.lr or recipe.roles.{role}.lr), "
                        f"or the method's coefficients; the last good checkpoint is kept")


def _train_epoch(method: Method, optimizers: dict[str, torch.optim.Optimizer], batches: Batches, epoch: int,
                 config: Config, runtime: Runtime, progress: "tqdm | None" = None) -> dict[str, float]:
    method.train()
    sums: dict[str, Tensor | float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    steps = len(batches)
    images = 0
    started = time.perf_counter()
    for index, (x, y) in enumerate(batches.epoch(epoch)):
        set_learning_rates(optimizers, config.recipe, epoch, index / steps)
        step = train_step(method, optimizers, x, y, epoch, runtime, index)
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


def _roles_to_update(requested: frozenset[str] | None, optimizers: dict[str, Any], runtime: Runtime) -> list[str]:
    roles = sorted(optimizers) if requested is None else sorted(requested)
    unknown = set(roles) - set(optimizers)
    if unknown:
        raise KeyError(f"step asked to update unknown roles {sorted(unknown)}; roles are {sorted(optimizers)}")
    if runtime.world_size > 1:
        # A role backwarded on some ranks only would leave them waiting in DDP's all-reduce: fail on all at once.
        distributed.check_same_roles(roles, sorted(optimizers), runtime.device)
    return roles


def _accumulate(sums: dict[str, Any], counts: dict[str, int], key: str, value: Tensor | float) -> None:
    sums[key] = sums[key] + (value.detach().float() if torch.is_tensor(value) else value)
    counts[key] += 1


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _rng_state() -> dict[str, Any]:
    """Every generator's state in types that ``torch.load(weights_only=True)`` accepts."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _resume_key(config: Config, spec: RunSpec) -> dict[str, Any]:
    """What must match for a checkpoint to be continued: everything but how the run is executed."""
    resolved = config.to_dict()
    for volatile in ("runtime", "tracking", "sweep", "analysis", "pipeline"):
        resolved.pop(volatile)
    resolved["methods"] = {spec.method: resolved["methods"].get(spec.method, {})}
    return {"method": spec.method, "seed": spec.seed, "config": resolved}


def load_state(path: Path, what: str, fix: str) -> Any:
    """``torch.load`` of a file someone may have handed us: tensors and plain containers only, never
    code (a crafted pickle is refused), and a clear error naming the file and the fix."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: refused to load this {what}: it holds more than tensors and plain values "
                              f"({str(error).splitlines()[0]}). Files from others are never unpickled as code; "
                              f"{fix}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: this {what} is corrupt or truncated ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else 'no detail'}); {fix}") from None


class CheckpointError(ConfigError):
    """A checkpoint or predictions file that cannot be read safely."""


def load_checkpoint(spec: RunSpec, config: Config, mode: str) -> dict[str, Any] | None:
    """``mode``: "auto" resumes a checkpoint written by the same config and starts fresh otherwise;
    "always" requires one; "never" ignores it."""
    path = spec.checkpoint_dir / "last.pt"
    if mode == "never" or not path.exists():
        if mode == "always":
            raise FileNotFoundError(f"--resume always: no checkpoint at {path}")
        return None
    state = load_state(path, "checkpoint", "delete it or rerun with --resume never to start this run over")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or state.get("key") != _resume_key(config, spec):
        if mode == "always":
            raise ConfigError(f"{path} was written by a different configuration; rerun with --resume never "
                              f"(or --resume auto) to start over")
        print(f"[reproduce] {path} belongs to a different configuration: starting from scratch")
        return None
    return state


# ----------------------------------------------------------------------------------------------
# The run


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
    distributed.wrap_roles(method, runtime, config.runtime)  # torchrun: one DDP per role (reproduce/distributed.py)

    state = load_checkpoint(spec, config, resume)
    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"epoch": 0, "score": -math.inf}
    start_epoch, tracker_key = 1, None
    if state is not None:
        if state["epoch"] >= config.recipe.epochs and (spec.run_dir / "metrics.json").is_file():
            print(f"[reproduce] {spec.run_dir}: already done ({state['epoch']} epochs, same configuration); "
                  f"--resume never trains it again", flush=True)
            return json.loads((spec.run_dir / "metrics.json").read_text())
        method.load_state_dict(state["method"])
        for role, optimizer in optimizers.items():
            optimizer.load_state_dict(state["optimizers"][role])
        _restore_rng(state["rng"])
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
    bar = _epoch_bar(config, runtime, spec, start_epoch, len(train_batches))

    fixed_logits: dict[str, dict[str, Tensor]] = {}
    try:
        for epoch in range(start_epoch, config.recipe.epochs + 1):
            row: dict[str, float] = {"epoch": epoch}
            row.update(_train_epoch(method, optimizers, train_batches, epoch, config, runtime, bar))
            metrics, logits, labels = evaluate(method, eval_batches, runtime, fixed_logits)
            row.update(metrics)
            history.append(row)
            if row[primary_score] > best["score"]:
                best = {"epoch": epoch, "score": row[primary_score]}
                if runtime.is_main:
                    _save_networks(method, config, spec.checkpoint_dir / "best.pt", epoch)
                    atomic_torch_save({"logits": logits, "labels": labels, "epoch": epoch},
                                      spec.checkpoint_dir / "best_predictions.pt")
            tracker.log_epoch(row)
            if runtime.is_main:
                write_table(spec.run_dir / "history.tsv", history)
                atomic_torch_save({"format": CHECKPOINT_FORMAT, "key": _resume_key(config, spec), "epoch": epoch,
                                   "method": method.state_dict(),
                                   "optimizers": {r: o.state_dict() for r, o in optimizers.items()},
                                   "rng": _rng_state(), "history": history, "best": best,
                                   "tracker_key": tracker.key}, spec.checkpoint_dir / "last.pt")
                _report_epoch(bar, row, method, config)
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
            if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch < config.recipe.epochs:
                tracker.suspend()
                return {"stopped_after_epoch": epoch}
        if not history:
            raise ConfigError("recipe.epochs must be at least 1")
        summary = _finish(method, config, spec, tracker, eval_batches, runtime, history, best, best_key)
    except BaseException as error:
        tracker.finish({}, status=getattr(error, "tracking_status", "failed"))
        raise
    finally:
        if bar is not None:
            bar.close()
    return summary


BEST_KEYS = {"val": "best", "test": "best_test_selected"}  # metrics.json's name for the best epoch, by selection


def _epoch_bar(config: Config, runtime: Runtime, spec: RunSpec, start_epoch: int, steps: int) -> "tqdm | None":
    """A bar over the run's steps (epoch k/N, losses, img/s, ETA) when a person watches a terminal."""
    if config.runtime.quiet or not runtime.is_main or not sys.stderr.isatty():
        return None
    epochs = config.recipe.epochs
    return tqdm(total=epochs * steps, initial=(start_epoch - 1) * steps, desc=f"{spec.name} epoch {start_epoch}/{epochs}",
                unit="step", dynamic_ncols=True, leave=True)


def _report_epoch(bar: "tqdm | None", row: dict[str, float], method: Method, config: Config) -> None:
    if bar is not None:
        bar.set_description(f"{bar.desc.rsplit(' epoch ', 1)[0]} epoch {min(int(row['epoch']) + 1, config.recipe.epochs)}"
                            f"/{config.recipe.epochs}", refresh=False)
        bar.write(_epoch_line(row, method.eval_networks()))
    elif not config.runtime.quiet:
        print(_epoch_line(row, method.eval_networks()), flush=True)


def _finish(method: Method, config: Config, spec: RunSpec, tracker: Tracker, eval_batches: dict[str, Batches],
            runtime: Runtime, history: list[dict[str, float]], best: dict[str, Any], best_key: str) -> dict[str, Any]:
    """Write the run's outputs: weights (last and best), logits, method artefacts, metrics.json."""
    last_row = history[-1]
    best_row = next(row for row in history if row["epoch"] == best["epoch"])
    summary = {
        "method": spec.method, "seed": spec.seed, "dataset": config.dataset.name,
        "teacher": config.models.teacher, "student": config.models.student,
        "primary": method.primary, "networks": sorted(method.eval_networks()),
        "epochs": int(last_row["epoch"]), "selection": "val" if best_key == "best" else "test",
        best_key: _nest({"epoch": best_row["epoch"], **_evaluation_part(best_row)}),
        "last": _nest({"epoch": last_row["epoch"], **_evaluation_part(last_row)}),
        "signals": {k.split("/", 1)[1]: v for k, v in last_row.items() if k.startswith("signal/")},
        "time": {"train_s": sum(row["time/train_s"] for row in history),
                 "images_per_s": sum(row["time/images_per_s"] for row in history) / len(history)},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "device": str(runtime.device), **git_commit()},
    }
    if runtime.is_main:
        # Last-epoch logits are recomputed here so a run resumed after its final epoch still has them.
        _, last_logits, labels = evaluate(method, eval_batches, runtime)
        best_predictions = load_state(spec.checkpoint_dir / "best_predictions.pt", "predictions file",
                                      "rerun with --resume never")
        atomic_torch_save({"labels": labels, "last": last_logits, "best": best_predictions["logits"],
                           "best_epoch": best["epoch"], "last_epoch": last_row["epoch"],
                           "selection": summary["selection"]}, spec.run_dir / "predictions.pt")
        _save_networks(method, config, spec.run_dir / "final.pt", int(last_row["epoch"]))
        (spec.run_dir / "best.pt").write_bytes((spec.checkpoint_dir / "best.pt").read_bytes())
        _save_code(spec.run_dir / "code.tar.gz")
        for name, path in method.end_of_training(spec.run_dir).items():
            tracker.log_image(name, path)
        tracker.log_artifact(spec.run_dir / "final.pt")
        atomic_write_text(spec.run_dir / "metrics.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    tracker.finish(summary)
    return summary


def _evaluation_part(row: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in row.items() if k.startswith(("val/", "test/"))}


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _save_networks(method: Method, config: Config, path: Path, epoch: int) -> None:
    networks = method.eval_networks()
    atomic_torch_save({"epoch": epoch, "models": dataclasses.asdict(config.models),
                       "networks": {name: net.state_dict() for name, net in networks.items()}}, path)


def _save_code(path: Path) -> None:
    """The source that produced these results, next to them (airbench's habit)."""
    package = Path(__file__).resolve().parent
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for source in sorted(package.rglob("*.py")):
            archive.add(source, arcname=str(source.relative_to(package.parent)))
    path.write_bytes(buffer.getvalue())


def _epoch_line(row: dict[str, float], networks: dict[str, nn.Module]) -> str:
    parts = [f"epoch {int(row['epoch'])}"]
    for name in networks:
        if f"test/{name}/top1" in row:
            val = f"val {row[f'val/{name}/top1']:.2f} " if f"val/{name}/top1" in row else ""
            parts.append(f"{name}: {val}test {row[f'test/{name}/top1']:.2f} ece {100 * row[f'test/{name}/ece']:.2f} %")
    parts.append(f"{row['time/images_per_s']:.0f} img/s")
    return " | ".join(parts)
