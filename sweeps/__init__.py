"""Optuna hyper-parameter studies over each method's coefficients (``python -m sweeps``).

Modules, each importing only those above it:

- ``space``: a method's ``search_space`` (or params.yaml ``sweep.spaces.<method>``, which replaces it)
  → Optuna distributions, validated against the method.
- ``settings``: the ``sweep:`` section, which methods it sweeps, the objectives.
- ``plan``: a study's job and name (method + hash of what makes trials comparable), its pruner, its
  budget in words, and one trial's configuration (the run in miniature: epoch-counted settings scaled).
- ``storage``: SQLite, PostgreSQL or any RDB URL, or a journal file; one-line errors for a storage that
  cannot be used.
- ``budget``: the exact shared trial budget and interrupted trials (heartbeat, process id, retried),
  through Optuna's public API; why not ``MaxTrialsCallback`` alone is explained there.
- ``objective``: one trial (a ``reproduce.train.train`` run scored on validation), the sampler.
- ``tracked``: the study's W&B/MLflow run, under which every trial's run nests.
- ``workers``: worker processes, each pinned to a device (``--devices``).
- ``report``: results from the storage alone (``python -m sweeps report`` rewrites them).
- ``study``: ``run_study(config, method, track=, quiet=, devices=)``, the entry point of the CLI and
  of the pipeline's stages.

Outputs, outside the source tree (paths relative to the working directory):

- ``studies/<method>.db``: the default storage (``sweep.storage``, ``sqlite:///studies/{method}.db``).
- ``sweep-results/<method>/``: the results of one study (the folder "shows" it):

  - ``summary.json`` (format 1)::

      {"format": 1, "method": "kd", "study": "kd-1a2b3c4d", "storage": "sqlite:///studies/kd.db",
       "identity": {...what the hash in the study's name stands for...},
       "metric": "val_top1", "direction": "maximize",
       "objectives": [{"name": "val_top1", "metric": "top1", "direction": "maximize"}, ...],
       "budget": {"text": "3 trials x 2 of the run's 8 epochs, no pruning; ...", "n_trials": 3,
                  "epochs_per_trial": 2, "run_epochs": 8, "pruner": "median" | "hyperband" | "none",
                  "warmup_epochs": 0, "first_prune_epoch": 5 | null, "sampler": "TPE (...)", "seed": 0,
                  "workers": 1, "min_complete_trials": 10,
                  "scaled_to_trial": {"methods.dkd.warmup_epochs": {"run": 3, "trial": 1}, ...}},
       "smoke": true,            # fewer than budget.min_complete_trials complete trials
       "counts": {"complete": 2, "pruned": 1, "failed": 0, "interrupted": 0, "running": 0, "waiting": 0},
       "budget_used": 3,         # complete + pruned + failed (by their own error); interrupted: retried
       "best": {"trial": 1, "value": 91.2, "values": {"val_top1": 91.2}, "params": {...}} | null,
       "importance": {"val_top1": {"temperature": 0.61, ...}} | null,
       "importance_note": "2 complete trial(s); importances need at least 10 (...)" | null,
       "results_dir": "sweep-results/kd",
       "files": {"trials": "trials.csv", "pareto": "pareto.csv" | null,
                 "best_params": "best_params.yaml" | null, "figures": ["figures/optimization_history.png", ...]}}

    ``value`` is the first objective's (val top-1 in percent; ``val_ece`` is a fraction).
  - ``best_params.yaml``: ``{methods: {<method>: {param: value}}}``, an overlay for ``python -m reproduce
    train --params-from``; its comment header names the study, the trial, the scores and the budget, and
    says "A smoke test, not a tuning result" below 10 complete trials (only then "Train with them").
  - ``trials.csv``: ``study.trials_dataframe()``, one row per trial: ``number``, ``state`` (COMPLETE,
    PRUNED, FAIL, RUNNING, WAITING), one column per objective (``val_top1``, ``val_ece``),
    ``epochs_trained``, ``duration_s``, ``params_<name>``, ``retry_of``, ``error``.
  - ``pareto.csv`` (multi-objective studies): the rows of the Pareto front.
  - ``figures/*.png``: Optuna's matplotlib visualisations, each where it has something to show:
    ``optimization_history``, ``slice``, ``intermediate_values`` (per-epoch validation score),
    ``param_importances`` (only with an importance), ``pareto_front`` (multi-objective).
  - ``trials/<study>/<number>/``: each trial's run (metrics.json, history.tsv).

  A new study takes the folder over only once it has a complete trial; until then (and if it never
  gets one) its summary.json and trials.csv go to ``trials/<study>/`` and the shown study stays whole.
- ``checkpoints/sweeps/<study>/<number>/``: a running trial's checkpoint, deleted when it ends.
"""
