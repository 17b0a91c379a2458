"""dvclive: one method's stage in ``dvclive/<method>/``, written with DVC's own logger.

- ``metrics.json``: mean and std over seeds of every trained network's test top-1 (best and last epoch)
  and last-epoch ECE, and the study's best trial. Detail, not a declared DVC metric (dvc.yaml declares
  only the headline, dvclive/metrics.json): ``dvc metrics show dvclive/kd/metrics.json`` reads it.
- ``params.yaml``: the method's coefficients as the stage ran them.
- ``plots/metrics/<network>/<metric>.tsv``: per-epoch curves, mean over seeds (``dvc plots show dvclive/kd/plots``).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path
from typing import Any

from reproduce.config import Config
from reproduce.methods.base import Method

from pipeline.sync import trained_networks

DVCLIVE_ROOT = Path("dvclive")


def write_live(directory: Path, cls: type[Method], summaries: list[dict[str, Any]], histories: list[list[dict[str, float]]],
               config: Config, study: dict[str, Any] | None = None) -> None:
    """metrics.json, params.yaml and plots/ of one method (see the module's docstring)."""
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
    live.summary = seed_statistics(cls, summaries)
    if study is not None and study["best"] is not None:  # sweeps' summary (sweep-results/<method>/summary.json)
        live.summary["sweep"] = {"trials": study["budget_used"], "complete": study["counts"]["complete"],
                                 "best_trial": study["best"]["trial"], **study["best"]["values"]}
    live.make_summary()
    live.end()


def best_key(summary: dict[str, Any]) -> str:
    """metrics.json's best epoch: ``best`` chosen on validation, ``best_test_selected`` on test (the papers')."""
    return "best" if summary.get("selection", "val") == "val" else "best_test_selected"


def seed_statistics(cls: type[Method], summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """For each trained network: test top-1 at the best and the last epoch and test ECE (%) at the last,
    mean and std over seeds. The best epoch's name says how it was chosen."""
    numbers: dict[str, Any] = {"seeds": len(summaries)}
    for network in trained_networks(cls):
        values: dict[str, list[float]] = {}
        for summary in summaries:
            kind = best_key(summary)
            test_best = summary[kind]["test"].get(network)
            test_last = summary["last"]["test"].get(network)
            if test_best is None or test_last is None:
                continue
            values.setdefault(f"test_top1_{kind}", []).append(test_best["top1"])
            values.setdefault("test_top1_last", []).append(test_last["top1"])
            values.setdefault("test_ece_pct_last", []).append(100 * test_last["ece"])
        numbers[network] = {name: {"mean": round(statistics.fmean(v), 4),
                                   "std": round(statistics.stdev(v), 4) if len(v) > 1 else 0.0}
                            for name, v in values.items()}
    return numbers
