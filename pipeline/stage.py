"""One DVC stage: ``python -m pipeline stage --method M`` trains M for every seed of ``pipeline.seeds``,
runs M's Optuna study when M has a search space, and writes M's numbers with dvclive.

One process per method (one torch import, one tracking start-up: on a 2-core machine these cost more
than a small run). Checkpoints live outside the stage's outputs, so a rerun for a change that does not
touch training (say ``sweep.n_trials``) resumes finished runs instead of retraining them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reproduce.config import Config
from reproduce.io import atomic_write_text, clean_temporaries

from pipeline.live import DVCLIVE_ROOT, best_key, seed_statistics, write_live


def run_stage(config: Config, method: str, *, runs_root: Path = Path("runs"), checkpoints_root: Path = Path("checkpoints"),
              live_root: Path = DVCLIVE_ROOT, resume: str = "auto", track: bool = True) -> dict[str, Any]:
    """Train ``method`` for every seed, run its study (a method with a search space), write ``dvclive/<method>/``."""
    from reproduce.launch import Launch, launch_runs, runs_for
    from reproduce.methods import get_method
    from sweeps.plan import plan_job
    from sweeps.study import RESULTS_ROOT, preflight, run_study

    cls = get_method(method)
    clean_temporaries(live_root / method, RESULTS_ROOT / method)  # left by a killed stage; runs clean their own
    swept = plan_job(config, method, track=track) is not None  # checks the search space before any training
    if swept:
        preflight(config, method)  # and what would fail every trial (no validation split, ...)
    # The seeds one after the other here, or at once on pipeline.devices (logs in checkpoints/launch/).
    runs = runs_for([method], config.pipeline.seeds, runs_root, checkpoints_root)
    launch = Launch(f"stage-{method}", config, runs, checkpoints_root / "launch", resume, track)
    summaries = launch_runs(launch).summaries()  # RunsFailedError names the runs that failed and their logs
    for seed, summary in zip(config.pipeline.seeds, summaries):
        print(f"[{method}] seed {seed}: {seed_line(summary)}", flush=True)
    study = run_study(config, method, track=track) if swept else None
    if not swept:  # the stage declares the results folder of every method
        atomic_write_text(RESULTS_ROOT / method / "not_swept.txt",
                          f"{method} declares no search space (search_space = {{}}): nothing to tune.\n")
    histories = [read_history(runs_root / method / f"seed{seed}" / "history.tsv") for seed in config.pipeline.seeds]
    write_live(live_root / method, cls, summaries, histories, config, study)
    return {"method": method, "seeds": config.pipeline.seeds, "statistics": seed_statistics(cls, summaries)}


def seed_line(summary: dict[str, Any]) -> str:
    kind, primary = best_key(summary), summary["primary"]
    best, last = summary[kind], summary["last"]
    return (f"{primary} test top-1 {best['test'][primary]['top1']:.2f} at best epoch {best['epoch']} "
            f"({'val' if kind == 'best' else 'test'}-selected), {last['test'][primary]['top1']:.2f} at the last; "
            f"ECE {100 * last['test'][primary]['ece']:.2f} %")


def read_history(path: Path) -> list[dict[str, float]]:
    """A run's history.tsv: one dict per epoch, empty cells left out."""
    lines = path.read_text().splitlines()
    columns = lines[0].split("\t")
    return [{column: float(cell) for column, cell in zip(columns, line.split("\t")) if cell} for line in lines[1:]]
