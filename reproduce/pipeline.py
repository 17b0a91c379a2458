"""The DVC pipeline's view of the method registry, and the stage that trains one method over its seeds.

``dvc.yaml`` cannot import Python, so ``python -m reproduce pipeline`` (run by ``make repro``) writes
what it needs from the registry into ``registry.yaml`` (DVC ``vars``): which methods train from
scratch, which distil from the trained teacher, which have a search space, and the curated plots.
It also gives every registered method an entry under ``methods:`` in params.yaml, because DVC
tracks ``methods.<name>`` per stage and refuses a stage whose parameter key is missing. A test
checks that the committed files agree with the registry, so a method added as one file cannot be
forgotten by the pipeline.

``python -m reproduce stage --method M`` is one DVC stage: in one process (one torch import, one
tracking start-up: on a 2-core machine these cost more than a small run) it trains M for every
seed of ``pipeline.seeds``, runs M's Optuna study when M has a search space (sweeps/), and writes
the headline numbers and per-epoch curves with dvclive into ``dvclive/<M>/`` for ``dvc metrics``,
``dvc plots`` and ``dvc exp show``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
from pathlib import Path
from typing import Any

import yaml

from reproduce.config import Config, ConfigError
from reproduce.io import atomic_write_text

REGISTRY_FILE = Path("registry.yaml")
DVCLIVE_ROOT = Path("dvclive")
HEADER = ("# Generated from the method registry (reproduce/methods/) by `python -m reproduce pipeline`,\n"
          "# which `make repro` runs first. Do not edit: add a method file and rerun the command.\n")


def method_lists(only: list[str] | None = None) -> dict[str, Any]:
    """What the DVC stages iterate over, derived from the registry (``only``: a subset, for quick runs)."""
    from reproduce.methods.base import registered

    methods = [cls for cls in registered() if only is None or cls.name in only]
    if only is not None and len(methods) != len(set(only)):
        known = {cls.name for cls in registered()}
        raise ConfigError(f"unknown method(s) {sorted(set(only) - known)}; registered: {', '.join(sorted(known))}")
    swept = [cls.name for cls in methods if cls.search_space]
    return {"registry": {
        "standalone": [cls.name for cls in methods if cls.kind.value != "offline"],
        "distill": [cls.name for cls in methods if cls.kind.value == "offline"],
        "sweep": swept,
        # The series of dvc.yaml's curated plots (reports/plots/*.tsv, a column per method).
        "plot_columns": {network: [cls.name for cls in methods if network in trained_networks(cls)]
                         for network in ("student", "teacher")},
    }}


def trained_networks(cls: type) -> list[str]:
    """The networks a method trains whose curves the plots compare: the primary network, plus the
    teacher of an online method (a frozen teacher's curve is a flat line, the same in every run)."""
    return [cls.primary] + (["teacher"] if cls.kind.value == "online" and cls.primary != "teacher" else [])


def sync(params_path: Path = Path("params.yaml"), registry_path: Path = REGISTRY_FILE,
         only: list[str] | None = None) -> list[str]:
    """Write registry.yaml and give every listed method an entry in params.yaml; returns what changed."""
    changed = []
    text = HEADER + yaml.safe_dump(method_lists(only), sort_keys=False, width=120)
    if not registry_path.exists() or registry_path.read_text() != text:
        atomic_write_text(registry_path, text)
        changed.append(str(registry_path))
    lists = method_lists(only)["registry"]
    missing = add_method_entries(params_path, lists["standalone"] + lists["distill"])
    if missing:
        changed.append(f"{params_path} (methods: {', '.join(missing)})")
    return changed


def add_method_entries(params_path: Path, names: list[str]) -> list[str]:
    """Append ``  <name>: {}`` under params.yaml's top-level ``methods:`` for each missing name. Text,
    not a YAML round trip, so the user's comments and layout survive."""
    text = params_path.read_text()
    raw = yaml.safe_load(text) or {}
    present = raw.get("methods") or {}
    missing = [name for name in names if name not in present]
    if not missing:
        return []
    block = re.search(r"^methods:[^\n]*\n((?:[ \t]+[^\n]*\n|[ \t]*\n)*)", text, flags=re.MULTILINE)
    lines = "".join(f"  {name}: {{}}\n" for name in missing)
    if block is None:
        text = text.rstrip("\n") + "\n\nmethods:\n" + lines
    elif block.group(0).startswith("methods: {}"):
        text = text[:block.start()] + "methods:\n" + lines + text[block.start() + len("methods: {}\n"):]
    else:
        text = text[:block.end(1)] + lines + text[block.end(1):]
    if not isinstance((yaml.safe_load(text) or {}).get("methods"), dict):
        raise ConfigError(f"{params_path}: could not add methods {missing} under `methods:`; add `{missing[0]}: {{}}` "
                          f"there by hand")
    atomic_write_text(params_path, text)
    return missing


# ----------------------------------------------------------------------------------------------
# The per-method stage


def run_stage(config: Config, method: str, *, runs_root: Path = Path("runs"), checkpoints_root: Path = Path("checkpoints"),
              live_root: Path = DVCLIVE_ROOT, resume: str = "auto", track: bool = True,
              sweep: bool = True) -> dict[str, Any]:
    """Train ``method`` for every seed of ``pipeline.seeds``, run its study (``sweep`` and a search
    space), then write ``dvclive/<method>/``."""
    from reproduce.train import RunSpec, train
    from reproduce.methods import get_method

    cls = get_method(method)
    if sweep and cls.search_space and config.dataset.val_fraction == 0:
        raise ConfigError(f"{method}: its Optuna study scores trials on the validation split, and "
                          f"dataset.val_fraction is 0 (no validation split); set dataset.val_fraction > 0 "
                          f"or run the stage without the sweep")
    summaries = []
    for seed in config.pipeline.seeds:
        spec = RunSpec(method, seed, runs_root / method / f"seed{seed}", checkpoints_root / method / f"seed{seed}")
        summaries.append(train(config, spec, resume=resume, track=track))
        print(f"[{method}] seed {seed}: {headline_line(summaries[-1])}", flush=True)
    study = None
    if sweep and cls.search_space:
        from sweeps.study import run_study

        study = run_study(config, method, track=track)
    elif sweep:  # the stage declares sweeps/results/<method> for every method
        atomic_write_text(Path("sweeps/results") / method / "not_swept.txt",
                          f"{method} declares no search space (search_space = {{}}): nothing to tune.\n")
    histories = [_read_history(runs_root / method / f"seed{seed}" / "history.tsv") for seed in config.pipeline.seeds]
    write_live(live_root / method, cls, summaries, histories, config, study)
    return {"method": method, "seeds": config.pipeline.seeds, "headline": headline(cls, summaries)}


def headline(cls: type, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The few numbers per method that `dvc metrics show` and `dvc exp show` list: for each trained
    network, test top-1 at the best and the last epoch and test ECE (%) at the last, mean and std
    over seeds. The best epoch's name says how it was chosen (best = on validation,
    best_test_selected = on test, the papers' protocol)."""
    numbers: dict[str, Any] = {"seeds": len(summaries)}
    for network in trained_networks(cls):
        values: dict[str, list[float]] = {}
        for summary in summaries:
            best_key = "best" if summary.get("selection", "val") == "val" else "best_test_selected"
            test_best = summary[best_key]["test"].get(network)
            test_last = summary["last"]["test"].get(network)
            if test_best is None or test_last is None:
                continue
            values.setdefault(f"test_top1_{best_key}", []).append(test_best["top1"])
            values.setdefault("test_top1_last", []).append(test_last["top1"])
            values.setdefault("test_ece_pct_last", []).append(100 * test_last["ece"])
        numbers[network] = {name: {"mean": round(statistics.fmean(v), 4),
                                   "std": round(statistics.stdev(v), 4) if len(v) > 1 else 0.0}
                            for name, v in values.items()}
    return numbers


def headline_line(summary: dict[str, Any]) -> str:
    best_key = "best" if summary.get("selection", "val") == "val" else "best_test_selected"
    primary = summary["primary"]
    best, last = summary[best_key], summary["last"]
    return (f"{primary} test top-1 {best['test'][primary]['top1']:.2f} at best epoch {best['epoch']} "
            f"({'val' if best_key == 'best' else 'test'}-selected), {last['test'][primary]['top1']:.2f} at the last; "
            f"ECE {100 * last['test'][primary]['ece']:.2f} %")


def write_live(directory: Path, cls: type, summaries: list[dict[str, Any]], histories: list[list[dict[str, float]]],
               config: Config, study: dict[str, Any] | None = None) -> None:
    """dvclive: the headline numbers as metrics.json, the method's coefficients as params.yaml, and
    per-epoch curves (mean over seeds) under plots/metrics/<network>/<metric>.tsv."""
    from dvclive import Live

    live = Live(dir=str(directory), save_dvc_exp=False, dvcyaml=None, report=None, resume=False)
    live.log_params({"method": cls.name, "seeds": list(config.pipeline.seeds),
                     "coefficients": dataclasses.asdict(cls.parse_params(config.methods.get(cls.name)))})
    epochs = min(len(history) for history in histories)
    for index in range(epochs):
        live.step = int(histories[0][index]["epoch"])
        for network in trained_networks(cls):
            for metric, column, scale in (("test_top1", f"test/{network}/top1", 1.0),
                                          ("test_ece_pct", f"test/{network}/ece", 100.0),
                                          ("train_loss", f"train/{network}/loss", 1.0)):
                values = [history[index].get(column) for history in histories]
                if all(isinstance(v, float) and math.isfinite(v) for v in values):
                    live.log_metric(f"{network}/{metric}", round(scale * statistics.fmean(values), 4))
    live.summary = headline(cls, summaries)
    if study is not None and study.get("best") is not None:
        best = study["best"]
        live.summary["sweep"] = {"trials": sum(study["trials"].values()), "best_trial": best["number"],
                                 **{name: best[name] for name in study["objectives"]}}
    live.make_summary()
    live.end()


def _read_history(path: Path) -> list[dict[str, float]]:
    lines = path.read_text().splitlines()
    columns = lines[0].split("\t")
    return [{column: float(cell) for column, cell in zip(columns, line.split("\t")) if cell} for line in lines[1:]]
