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
# Over 2 s on 2 cores (R2KD builds and runs a pruned copy of a WRN-sized teacher at 64x64): CI runs them.
SLOW_RECIPES = {"r2kd_tinyimagenet"}
DATASET_SHAPES = {  # name -> (classes, channels, image size used here)
    "cifar10": (10, 3, 32), "cifar100": (100, 3, 32), "tinyimagenet": (200, 3, 64), "imagenet": (1000, 3, 64),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_paper_has_a_recipe() -> None:
    names = {path.stem for path in RECIPES}
    assert {"dkd_cifar100", "aekt_cifar100", "bdkd_cifar100", "sokd_cifar100", "r2kd_cifar100", "switokd_cifar100",
            "switokd_cifar10", "switokd_tinyimagenet", "switokd_imagenet"} <= names


@pytest.mark.parametrize("recipe", [pytest.param(path, id=path.stem, marks=[pytest.mark.slow] * (path.stem in SLOW_RECIPES))
                                    for path in RECIPES])
def test_recipe_builds_and_trains_one_step(recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(PROJECT)
    overlay = yaml.safe_load(recipe.read_text())
    config = load_config("params.yaml", extra=overlay)
    method_name = recipe.stem.split("_")[0]
    assert method_name in overlay["methods"]
    # A recipe distils from a released teacher (teacher.checkpoint) or trains its own first.
    assert method_name in config.pipeline.methods and ("teacher" in config.pipeline.methods or config.teacher.checkpoint)
    # The papers' protocol: the whole training set trains and the best epoch is chosen on test.
    assert config.dataset.val_fraction == 0
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
    x, y = torch.randn(2, channels, size, size), torch.randint(0, classes, (2,))
    step = method.step(x, y, 1)
    roles = step.update if step.update is not None else set(method.roles())
    total = sum(sum(step.losses[role].values()) for role in roles)
    assert torch.isfinite(total)
    total.backward()
    for role in roles:
        assert any(p.grad is not None for p in method.roles()[role].parameters()), role


def test_switokd_recipes_use_its_own_wrn_and_table4s_rows() -> None:
    for recipe in ("switokd_cifar10", "switokd_cifar100"):
        config = load_config(PROJECT / "params.yaml", extra=yaml.safe_load((PROJECT / "configs" / "papers" / f"{recipe}.yaml").read_text()))
        assert config.models.teacher.startswith("switokd_wrn_") and config.recipe.epochs == 299  # range(1, 300)
        assert {"vanilla", "dml", "kdcl", "switokd"} <= set(config.pipeline.methods)


def test_sokd_recipe_loads_data_as_its_code_does() -> None:
    config = load_config(PROJECT / "params.yaml", extra=yaml.safe_load((PROJECT / "configs" / "papers" / "sokd_cifar100.yaml").read_text()))
    assert config.dataset.augment.padding_mode == "reflect" and config.dataset.normalization == "cifar10"


@pytest.mark.slow
def test_a_recipe_trains_on_the_whole_training_set_and_reports_the_test_selected_best(tmp_path: Path) -> None:
    """The recipe command end to end on a CIFAR-10 fixture in the real pickle format (tiny networks,
    one epoch): every image of the training set trains, metrics.json and the report say best on test."""
    import json
    import subprocess
    import sys

    from tests.data_fixtures import write_cifar10

    write_cifar10(tmp_path / "raw", n_train=160, n_test=40)
    overrides = ["dataset.raw_root=raw", "dataset.verify_md5=false", "recipe.epochs=2", "recipe.batch_size=32",
                 "models.teacher=resnet8", "models.student=resnet8", "pipeline.seeds=[0]",
                 "pipeline.methods=[vanilla,kd]", "runtime.threads=1"]
    command = [sys.executable, "-m", "reproduce", "recipe", str(PROJECT / "configs" / "papers" / "switokd_cifar10.yaml"),
               "--params", str(PROJECT / "params.yaml"), "--no-track", *[f"--set={o}" for o in overrides]]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT), "HOME": str(tmp_path)}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "the papers' protocol" in result.stdout
    manifest = json.loads((tmp_path / "data" / "prepared" / "cifar10" / "manifest.json").read_text())
    assert manifest["counts"]["train"] == 160 and manifest["counts"]["val"] == 0
    runs = tmp_path / "runs-papers" / "switokd_cifar10"
    for name in ("teacher", "vanilla", "kd"):
        summary = json.loads((runs / name / "seed0" / "metrics.json").read_text())
        assert summary["selection"] == "test" and "best_test_selected" in summary and "best" not in summary
    report = subprocess.run([sys.executable, "-m", "analysis", "--runs", str(runs), "--out", str(tmp_path / "reports"),
                             "--params", str(PROJECT / "params.yaml"), "--no-track"], cwd=tmp_path,
                            capture_output=True, text=True, env=env, timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "selected on test" in (tmp_path / "reports" / "index.html").read_text()
