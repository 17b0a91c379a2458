"""Shared fixtures: the real digits dataset prepared once per session, a tiny fast config, and a
trained teacher for offline methods. Tracking services are pointed into temporary directories so
tests never touch $HOME or the network."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from reproduce.config import Config, config_from_dict, deep_merge

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _isolated_tracking(tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("tracking-home")
    os.environ.update({
        "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(home),
        "WANDB_CACHE_DIR": str(home / "wandb-cache"), "WANDB_DATA_DIR": str(home / "wandb-data"),
        "WANDB_CONFIG_DIR": str(home / "wandb-config"), "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}", "DVC_NO_ANALYTICS": "1",
        "REPRODUCE_TRACKING_DIR": str(home / "tracking-ledger"),  # runs pending a sync (reproduce/tracking/ledger.py)
    })


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite store with its tables made, to copy: making them costs seconds, a copy nothing."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="session")
def prepared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits prepared through the real `prepare` path, shared by the whole session (read-only)."""
    from reproduce.data.prepare import prepare

    root = tmp_path_factory.mktemp("prepared")
    prepare("digits", root / "raw", root, val_fraction=0.15, split_seed=0, progress=False)
    return root


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny batches gain nothing from threads on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(prepared_root: Path, tmp_path: Path, **sections: dict) -> Config:
    """A config that trains in seconds on digits: tiny networks, few epochs, local files only."""
    raw = {
        "dataset": {"name": "digits", "prepared_root": str(prepared_root), "augment": {"crop_padding": 1, "flip": False}},
        "models": {"teacher": "resnet8", "student": "resnet8"},
        "recipe": {"epochs": 2, "batch_size": 64, "optimizer": {"lr": 0.05},
                   "schedule": {"name": "cosine", "milestones": []}},
        "runtime": {"quiet": True, "threads": 1, "compile": "off"},
        "teacher": {"seed": 0, "runs_root": str(tmp_path / "teacher-runs")},
        "tracking": {"wandb": {"enabled": False}, "mlflow": {"enabled": False}},
    }
    return config_from_dict(deep_merge(raw, sections))


@pytest.fixture(scope="session")
def teacher_runs_root(prepared_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher trained once per session (3 epochs of resnet8) for the offline methods' tests."""
    from reproduce.train import RunSpec, train

    tmp = tmp_path_factory.mktemp("teacher")
    config = tiny_config(prepared_root, tmp, recipe={"epochs": 3})
    root = tmp / "teacher-runs"
    train(config, RunSpec("teacher", 0, root / "seed0", tmp / "checkpoints"), track=False)
    return root
