"""The DVC pipeline's glue, the layer above the library: ``reproduce`` (training, methods, data),
``sweeps`` (Optuna studies) and ``analysis`` (the report) know nothing of DVC; this package turns the
method registry into what ``dvc.yaml`` iterates over and runs one DVC stage per method.

- ``python -m pipeline sync`` (``make repro`` runs it before ``dvc repro``): registry.yaml and
  params.yaml's method entries from the method registry (pipeline/sync.py).
- ``python -m pipeline stage --method M``: the stage ``train@M`` / ``distill@M`` (pipeline/stage.py),
  whose numbers dvclive writes for ``dvc metrics``, ``dvc plots`` and ``dvc exp`` (pipeline/live.py).
"""
