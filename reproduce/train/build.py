"""How a run gets its networks: fresh ones by architecture, the pre-trained teacher from its file."""

from __future__ import annotations

import torch
from torch import nn

from reproduce import models
from reproduce.config import Config, ConfigError
from reproduce.methods.base import Networks
from reproduce.train.checkpoint import load_state


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
