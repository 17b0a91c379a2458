"""What a finished run leaves behind (metrics.json, predictions, weights, its code) and what a person
watching it sees (the epoch line and the progress bar)."""

from __future__ import annotations

import io
import json
import platform
import sys
import tarfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from reproduce.config import Config
from reproduce.data.loader import Batches
from reproduce.io import atomic_copy, atomic_torch_save, atomic_write_bytes, atomic_write_text
from reproduce.methods.base import Method
from reproduce.numerics import describe as describe_cpu_numerics
from reproduce.runtime import Runtime
from reproduce.tracking import Tracker, git_commit
from reproduce.train.checkpoint import load_state, save_networks
from reproduce.train.evaluate import evaluate, to_host
from reproduce.train.spec import RunSpec

BEST_KEYS = {"val": "best", "test": "best_test_selected"}  # metrics.json's name for the best epoch, by selection


def finish(method: Method, config: Config, spec: RunSpec, tracker: Tracker, eval_batches: dict[str, Batches],
           runtime: Runtime, history: list[dict[str, float]], best: dict[str, Any], best_key: str,
           networks: dict[str, nn.Module] | None = None) -> dict[str, Any]:
    """Write the run's outputs: weights (last and best), logits, method artefacts, metrics.json. ``networks``:
    what evaluates each network (the compiled copies with runtime.compile), as in training."""
    last_row = history[-1]
    best_row = next(row for row in history if row["epoch"] == best["epoch"])
    teacher = method.eval_networks().get("teacher")  # a loaded (pretrained) teacher carries its provenance
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
                        "device": str(runtime.device), **git_commit(),
                        **(describe_cpu_numerics() if runtime.device.type == "cpu" else {})},
        "teacher_source": teacher.source.to_dict() if getattr(teacher, "source", None) else None,
    }
    if runtime.is_main:
        # Last-epoch logits are recomputed here so a run resumed after its final epoch still has them.
        _, last_logits, labels = evaluate(method, eval_batches, runtime, networks=networks)
        last_logits, labels = to_host(last_logits), {split: values.cpu() for split, values in labels.items()}
        best_predictions = load_state(spec.checkpoint_dir / "best_predictions.pt", "predictions file",
                                      "rerun with --resume never")
        atomic_torch_save({"labels": labels, "last": last_logits, "best": best_predictions["logits"],
                           "best_epoch": best["epoch"], "last_epoch": last_row["epoch"],
                           "selection": summary["selection"]}, spec.run_dir / "predictions.pt")
        save_networks({name: network.state_dict() for name, network in method.eval_networks().items()}, config,
                      spec.run_dir / "final.pt", int(last_row["epoch"]))
        atomic_copy(spec.checkpoint_dir / "best.pt", spec.run_dir / "best.pt")
        save_code(spec.run_dir / "code.tar.gz")
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


def save_code(path: Path) -> None:
    """The source that produced these results, next to them (airbench's habit)."""
    package = Path(__file__).resolve().parent.parent
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for source in sorted(package.rglob("*.py")):
            archive.add(source, arcname=str(source.relative_to(package.parent)))
    atomic_write_bytes(path, buffer.getvalue())


# ----------------------------------------------------------------------------------------------
# What a person watching sees


def epoch_bar(config: Config, runtime: Runtime, spec: RunSpec, start_epoch: int, steps: int) -> "tqdm | None":
    """A bar over the run's steps (epoch k/N, losses, img/s, ETA) when a person watches a terminal."""
    if config.runtime.quiet or not runtime.is_main or not sys.stderr.isatty():
        return None
    epochs = config.recipe.epochs
    return tqdm(total=epochs * steps, initial=(start_epoch - 1) * steps, desc=f"{spec.name} epoch {start_epoch}/{epochs}",
                unit="step", dynamic_ncols=True, leave=True)


def report_epoch(bar: "tqdm | None", row: dict[str, float], method: Method, config: Config) -> None:
    if bar is not None:
        bar.set_description(f"{bar.desc.rsplit(' epoch ', 1)[0]} epoch {min(int(row['epoch']) + 1, config.recipe.epochs)}"
                            f"/{config.recipe.epochs}", refresh=False)
        bar.write(epoch_line(row, method.eval_networks()))
    elif not config.runtime.quiet:
        print(epoch_line(row, method.eval_networks()), flush=True)


def epoch_line(row: dict[str, float], networks: dict[str, nn.Module]) -> str:
    parts = [f"epoch {int(row['epoch'])}"]
    for name in networks:
        if f"test/{name}/top1" in row:
            val = f"val {row[f'val/{name}/top1']:.2f} " if f"val/{name}/top1" in row else ""
            parts.append(f"{name}: {val}test {row[f'test/{name}/top1']:.2f} ece {100 * row[f'test/{name}/ece']:.2f} %")
    parts.append(f"{row['time/images_per_s']:.0f} img/s")
    return " | ".join(parts)
