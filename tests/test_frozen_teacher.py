"""The frozen, pre-trained teacher: prepared once for the device (BatchNorms folded into the convolutions),
left out of ``last.pt`` and reloaded from its source on resume, refused if it changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import tiny_config
from method_kit import build
from reproduce import models
from reproduce.train import CheckpointError, RunSpec, train
from reproduce.train.frozen import digest, fold_batchnorms, frozen_networks


def randomised(arch: str) -> nn.Module:
    """A network in eval mode whose BatchNorms do something (trained-like statistics and affine terms)."""
    torch.manual_seed(0)
    network = models.create(arch, 10, in_channels=3).eval()
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return network


@pytest.mark.parametrize("arch, folded", [
    ("resnet8", 9),  # every BatchNorm follows a convolution
    ("wrn_16_1", 6),  # pre-activation: the BatchNorms before a convolution, or on a residual input, stay
    pytest.param("vgg8", 5, marks=pytest.mark.slow), pytest.param("MobileNetV2", 53, marks=pytest.mark.slow),
    pytest.param("ShuffleV1", 49, marks=pytest.mark.slow), pytest.param("ShuffleV2", 56, marks=pytest.mark.slow),
    pytest.param("ResNet18", 20, marks=pytest.mark.slow),
])
def test_folded_batchnorms_give_the_same_outputs_in_eval(arch: str, folded: int) -> None:
    network = randomised(arch)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = network(x)
    assert fold_batchnorms(network, x[:2]) == folded
    with torch.no_grad():
        actual = network(x)
    # float32 rounding only: about 1e-7 to 1e-6 of the largest logit (the CPU keeps the unfolded teacher).
    torch.testing.assert_close(actual, expected, rtol=0, atol=5e-6 * float(expected.abs().max()))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in network.modules()) == \
        sum(isinstance(m, nn.BatchNorm2d) for m in randomised(arch).modules()) - folded


@pytest.mark.parametrize("name, params, frozen", [
    ("kd", {}, ["teacher"]), ("sokd", {}, []),  # SOKD's code keeps its teacher's BatchNorms learning statistics
    ("sokd", {"frozen_bn": "eval"}, ["teacher"]), ("r2kd", {}, ["teacher"]),  # the code's pruned copy trains BN
    ("r2kd", {"pruned_teacher_mode": "eval"}, ["teacher", "pruned_teacher"]), ("dml", {}, []),
])
def test_only_networks_that_cannot_change_count_as_frozen(name: str, params: dict, frozen: list[str]) -> None:
    method = build(name, **params)
    networks = {id(module): attribute for attribute, module in method.named_children()}
    assert [networks[id(module)] for module in frozen_networks(method)] == frozen


@pytest.mark.slow
def test_last_checkpoint_leaves_the_teacher_out_and_a_resumed_run_matches(prepared_root: Path,
                                                                           teacher_runs_root: Path,
                                                                           tmp_path: Path) -> None:
    config = tiny_config(prepared_root, tmp_path, recipe={"epochs": 2}, teacher={"runs_root": str(teacher_runs_root)})
    straight = RunSpec("kd", 0, tmp_path / "straight", tmp_path / "ckpt-straight")
    resumed = RunSpec("kd", 0, tmp_path / "resumed", tmp_path / "ckpt-resumed")
    train(config, straight, track=False)
    train(config, resumed, stop_after_epoch=1, track=False)
    state = torch.load(resumed.checkpoint_dir / "last.pt", weights_only=True)
    assert state["method"] and not any(key.startswith("teacher.") for key in state["method"])
    teacher = models.create("resnet8", 10, in_channels=1)
    teacher.load_state_dict(torch.load(teacher_runs_root / "seed0" / "final.pt", weights_only=True)["networks"]["teacher"])
    assert state["frozen"] == digest([teacher])  # the teacher is referenced by its digest
    train(config, resumed, resume="always", track=False)
    for run in (straight, resumed):
        assert json.loads((run.run_dir / "metrics.json").read_text())["epochs"] == 2
    a, b = (torch.load(run.run_dir / "final.pt", weights_only=True)["networks"]["student"] for run in (straight, resumed))
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.slow
def test_a_resumed_run_refuses_a_teacher_that_changed(prepared_root: Path, teacher_runs_root: Path,
                                                      tmp_path: Path) -> None:
    import shutil

    runs = tmp_path / "teacher-copy"
    shutil.copytree(teacher_runs_root, runs)
    config = tiny_config(prepared_root, tmp_path, recipe={"epochs": 2}, teacher={"runs_root": str(runs)})
    spec = RunSpec("kd", 0, tmp_path / "run", tmp_path / "ckpt")
    train(config, spec, stop_after_epoch=1, track=False)
    saved = torch.load(runs / "seed0" / "final.pt", weights_only=True)
    weights = saved["networks"]["teacher"]
    weights[next(iter(weights))] += 1.0
    torch.save(saved, runs / "seed0" / "final.pt")
    with pytest.raises(CheckpointError, match="frozen teacher loaded now is not the one this run trained with"):
        train(config, spec, resume="always", track=False)
