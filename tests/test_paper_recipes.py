"""Every per-paper recipe in configs/papers loads over params.yaml, validates its method's options,
builds the method with the recipe's model pair and runs one training step on a batch of the
dataset's shape (ImageNet at a reduced 64x64 to stay fast)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from reproduce import models
from reproduce.config import load_config
from reproduce.methods import Networks, get_method

PROJECT = Path(__file__).resolve().parent.parent
RECIPES = sorted((PROJECT / "configs" / "papers").glob("*.yaml"))
DATASET_SHAPES = {  # name -> (classes, channels, image size used here)
    "cifar10": (10, 3, 32), "cifar100": (100, 3, 32), "tinyimagenet": (200, 3, 64), "imagenet": (1000, 3, 64),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_paper_has_a_recipe() -> None:
    names = {path.stem for path in RECIPES}
    assert {"dkd_cifar100", "aekt_cifar100", "bdkd_cifar100", "sokd_cifar100", "r2kd_cifar100", "switokd_cifar100",
            "switokd_cifar10", "switokd_tinyimagenet", "switokd_imagenet"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_recipe_builds_and_trains_one_step(recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(PROJECT)
    overlay = yaml.safe_load(recipe.read_text())
    config = load_config("params.yaml", extra=overlay)
    method_name = recipe.stem.split("_")[0]
    assert method_name in overlay["methods"]
    assert method_name in config.pipeline["standalone"] + config.pipeline["distill"]
    assert config.dataset.name in DATASET_SHAPES and config.models.teacher in models.available()
    for name, raw in overlay["methods"].items():  # every method block of the recipe is valid
        get_method(name).parse_params(raw)

    classes, channels, size = DATASET_SHAPES[config.dataset.name]

    def create(arch: str) -> nn.Module:
        return models.create(arch, classes, in_channels=channels)

    networks = Networks(config.models.teacher, config.models.student, classes, channels, create,
                        lambda: create(config.models.teacher).requires_grad_(False).eval())
    method_cls = get_method(method_name)
    torch.manual_seed(0)
    method = method_cls(networks, method_cls.parse_params(config.methods[method_name])).train()
    for role in method.roles():
        config.recipe.optimizer_for(role)  # the recipe's per-role overrides are valid
    x, y = torch.randn(4, channels, size, size), torch.randint(0, classes, (4,))
    step = method.step(x, y, 1)
    roles = step.update if step.update is not None else set(method.roles())
    total = sum(sum(step.losses[role].values()) for role in roles)
    assert torch.isfinite(total)
    total.backward()
    for role in roles:
        assert any(p.grad is not None for p in method.roles()[role].parameters()), role
