"""The teacher a run distils from (teacher.checkpoint), teacher-check, the released files, the recipes, export."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tarfile
import urllib.error
from pathlib import Path

import pytest
import torch
import yaml

from conftest import PROJECT, tiny_config
from reproduce.config import load_config
from reproduce.errors import UserError
from reproduce.methods.base import build_method
from reproduce.models import PretrainedError, SplitNet, create, load_pretrained
from reproduce.models import catalog
from reproduce.models.catalog import TeacherNotFoundError, known_teacher
from reproduce.models.export import export_network
from reproduce.models.upstream import key_map
from reproduce.train.build import check_teacher, make_networks
from test_pretrained import crd_resnet

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DIGITS = (10, 1)  # classes, channels of the prepared digits set


def crd_file(path: Path, arch: str, classes: int, channels: int, seed: int = 0) -> tuple[Path, SplitNet]:
    """A RepDistiller-format checkpoint of a random ``arch`` (saved as CRD's train_teacher.py does)."""
    torch.manual_seed(seed)
    model = create(arch, classes, channels).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {theirs: model.state_dict()[ours] for ours, theirs in key_map(model, arch).items()}
    torch.save({"epoch": 240, "model": state, "accuracy": torch.tensor(12.5), "optimizer": {}}, path)
    return path, model


def test_offline_sokd_and_r2kd_build_their_teachers_from_teacher_checkpoint(prepared_root: Path, tmp_path: Path) -> None:
    path, reference = crd_file(tmp_path / "teacher.pth", "resnet8", *DIGITS)
    config = tiny_config(prepared_root, tmp_path, teacher={"checkpoint": str(path)})
    x = torch.randn(4, 1, 8, 8)
    for name in ("kd", "sokd", "r2kd"):
        method = build_method(config, name, make_networks(config, *DIGITS, torch.device("cpu")))
        assert method.teacher.source.path == str(path) and method.teacher.source.accuracy == 12.5
        with torch.no_grad():
            assert torch.equal(method.teacher(x), reference(x)), name
        assert not any(parameter.requires_grad for parameter in method.teacher.parameters())
    # SOKD grafts its branch onto the loaded trunk; R2KD prunes a copy of the loaded weights.
    sokd = build_method(config, "sokd", make_networks(config, *DIGITS, torch.device("cpu")))
    assert sokd.aux.trunk is sokd.teacher.trunk
    r2kd = build_method(config, "r2kd", make_networks(config, *DIGITS, torch.device("cpu")))
    kept = r2kd.pruned_teacher.classifier.weight != 0
    assert torch.equal(r2kd.pruned_teacher.classifier.weight[kept], reference.classifier.weight[kept])


def test_teacher_check_measures_what_the_teacher_s_run_measured(prepared_root: Path, teacher_runs_root: Path,
                                                                 tmp_path: Path) -> None:
    """Without teacher.checkpoint the teacher is the teacher method's final.pt; teacher-check evaluates it
    on the same test split as its run did, and reads the run's own number beside it."""
    config = tiny_config(prepared_root, tmp_path, teacher={"runs_root": str(teacher_runs_root)})
    check = check_teacher(config)
    recorded = json.loads((teacher_runs_root / "seed0" / "metrics.json").read_text())["last"]["test"]["teacher"]
    assert check.top1 == pytest.approx(recorded["top1"]) and check.ece == pytest.approx(recorded["ece"])
    assert check.source.accuracy == pytest.approx(recorded["top1"]) and check.source.layout == "suite"
    assert check.gap is None and "not published" in "\n".join(check.report())


def test_teacher_check_warns_when_a_released_teacher_misses_its_published_accuracy(prepared_root: Path,
                                                                                    tmp_path: Path) -> None:
    path, _ = crd_file(tmp_path / "download_ckpts/cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth", "resnet56",
                       *DIGITS)
    config = tiny_config(prepared_root, tmp_path, models={"teacher": "resnet56"}, teacher={"checkpoint": str(path)})
    check = check_teacher(config)
    assert check.images == json.loads((prepared_root / "digits" / "manifest.json").read_text())["counts"]["test"]
    assert check.source.published == 72.34 and check.gap == pytest.approx(check.top1 - 72.34)
    report = check.report()
    assert report[1].endswith("72.34 % published, 12.50 % recorded in the checkpoint")
    assert report[2].startswith(f"warning: {check.gap:+.2f} points from the published accuracy")


def test_a_missing_released_teacher_says_where_it_comes_from(prepared_root: Path, tmp_path: Path) -> None:
    configured = "download_ckpts/cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth"
    config = tiny_config(prepared_root, tmp_path, models={"teacher": "resnet32x4"},
                         teacher={"checkpoint": str(tmp_path / configured)})
    networks = make_networks(config, *DIGITS, torch.device("cpu"))
    with pytest.raises(TeacherNotFoundError) as error:
        networks.load_teacher()
    message = str(error.value)
    assert "cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth in https://github.com/megvii-research/mdistiller/" \
           "releases/download/checkpoints/cifar_teachers.tar" in message
    assert "--download" in message and "--set teacher.checkpoint=null trains the teacher first" in message


def release_archive(tmp_path: Path) -> Path:
    path, _ = crd_file(tmp_path / "release" / "cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth", "resnet56", 100, 3)
    archive = tmp_path / "cifar_teachers.tar"
    with tarfile.open(archive, "w") as bundle:
        bundle.add(path, arcname="cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth")
    return archive


def test_download_fetches_the_release_and_checks_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = release_archive(tmp_path)
    fetched = []
    monkeypatch.setattr("torch.hub.download_url_to_file",
                        lambda url, dst, progress=True: fetched.append(url) or Path(dst).write_bytes(archive.read_bytes()))
    target = tmp_path / "work" / "download_ckpts/cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth"
    # The real release is hundreds of MB: a small download is an error page, deleted.
    with pytest.raises(UserError, match=r"bytes, not the cifar_teachers\.tar release"):
        catalog.fetch_teacher(target, progress=False)
    assert not (tmp_path / "work" / "download_ckpts" / "cifar_teachers.tar").exists()
    small = dataclasses.replace(catalog.CIFAR_TEACHERS, min_bytes=1000)
    monkeypatch.setattr(catalog, "KNOWN_TEACHERS", [dataclasses.replace(known, archive=small) if known.archive ==
                                                    catalog.CIFAR_TEACHERS else known for known in catalog.KNOWN_TEACHERS])
    assert catalog.fetch_teacher(target, progress=False) == target
    assert fetched[-1] == catalog.CIFAR_TEACHERS.url and target.is_file()
    assert load_pretrained("resnet56", target, 100).source.published == 72.34
    digest = (tmp_path / "work" / "download_ckpts" / "cifar_teachers.tar.sha256").read_text().split()[0]
    assert len(digest) == 64


def test_download_offline_says_where_to_put_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, dst: str, progress: bool = True) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torch.hub.download_url_to_file", offline)
    with pytest.raises(TeacherNotFoundError, match=r"could not download .*cifar_teachers\.tar.*--set "
                                                   r"teacher\.checkpoint=null"):
        catalog.fetch_teacher(tmp_path / "download_ckpts/cifar_teachers/vgg13_vanilla/ckpt_epoch_240.pth", False)
    with pytest.raises(TeacherNotFoundError, match="no release archive is known for it"):
        catalog.fetch_teacher(tmp_path / "mine.pth", progress=False)


RELEASED = {"dkd_cifar100", "aekt_cifar100", "r2kd_cifar100"}


@pytest.mark.parametrize("recipe", sorted((PROJECT / "configs" / "papers").glob("*.yaml")), ids=lambda p: p.stem)
def test_recipes_name_their_usage_and_distil_from_the_released_teachers(recipe: Path) -> None:
    header = [line for line in recipe.read_text().splitlines() if line.startswith("#")]
    assert any(line.startswith(f"# Usage: python -m reproduce recipe configs/papers/{recipe.name}") for line in header)
    config = load_config(PROJECT / "params.yaml", extra=yaml.safe_load(recipe.read_text()))
    checkpoint = config.teacher.checkpoint
    if recipe.stem in RELEASED:
        assert checkpoint == f"download_ckpts/cifar_teachers/{config.models.teacher}_vanilla/ckpt_epoch_240.pth"
    if checkpoint and checkpoint.startswith("torchvision:"):
        from torchvision.models import get_model_weights, get_weight

        assert get_weight(checkpoint.split(":", 1)[1]) in list(get_model_weights(config.models.teacher))
        assert config.dataset.normalization == "imagenet"
    elif checkpoint:
        assert known_teacher(checkpoint).arch == config.models.teacher
        assert "teacher" not in config.pipeline.methods  # nothing to train first


def finished_run(tmp_path: Path, student: str, classes: int, channels: int) -> tuple[Path, SplitNet]:
    torch.manual_seed(0)
    model = create(student, classes, channels).eval()
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"epoch": 7, "models": {"teacher": "resnet8", "student": student},
                "networks": {"student": model.state_dict(), "teacher": create("resnet8", classes, channels).state_dict()}},
               run / "final.pt")
    return run, model


def test_export_crd_reads_back_and_uses_crd_s_names(tmp_path: Path) -> None:
    run, model = finished_run(tmp_path, "resnet8x4", 100, 3)
    path = export_network(run, "crd")
    assert path == run / "export" / "student-resnet8x4-crd.pth"
    saved = torch.load(path, weights_only=True)
    assert saved["epoch"] == 7 and set(saved["model"]) == set(crd_resnet(8, [32, 64, 128, 256], 100))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_pretrained("resnet8x4", path, 100).eval()(x), model(x))
    with pytest.raises(PretrainedError, match="its official layout is crd"):
        export_network(run, "torchvision")


def test_export_torchvision_loads_into_torchvision(tmp_path: Path) -> None:
    import torchvision

    run, model = finished_run(tmp_path, "resnet18", 10, 3)
    path = export_network(run, "torchvision")
    reference = torchvision.models.resnet18(num_classes=10).eval()
    reference.load_state_dict(torch.load(path, weights_only=True))  # strict: every key by torchvision's name
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reference(x), model(x))
        assert torch.equal(load_pretrained("resnet18", path, 10).eval()(x), model(x))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_torchscript_runs_without_the_suite(tmp_path: Path) -> None:
    run, model = finished_run(tmp_path, "ShuffleV2", 10, 3)
    scripted = torch.jit.load(str(export_network(run, "torchscript", out=tmp_path / "student.pt")))
    for size in (32, 64):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            assert torch.equal(scripted(x), model(x))


def test_teacher_check_and_export_commands(prepared_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from reproduce.cli import main

    path, _ = crd_file(tmp_path / "download_ckpts/cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth", "resnet56",
                       *DIGITS)
    options = ["--params", str(PROJECT / "params.yaml"), "--set", f"dataset.prepared_root={prepared_root}",
               "--set", "models.teacher=resnet56", "--set", "runtime.threads=1"]
    assert main(["teacher-check", *options, "--set", f"teacher.checkpoint={path}"]) == 1  # far from 72.34
    out = capsys.readouterr().out
    assert f"teacher resnet56 from {path} (crd layout" in out and "72.34 % published" in out and "warning:" in out
    missing = str(tmp_path / "elsewhere/cifar_teachers/vgg13_vanilla/ckpt_epoch_240.pth")
    assert main(["teacher-check", *options, "--set", f"teacher.checkpoint={missing}"]) == 2
    assert "--set teacher.checkpoint=null trains the teacher first" in capsys.readouterr().err
    run, model = finished_run(tmp_path, "wrn_16_2", 10, 3)
    assert main(["export", str(run), "--format", "crd", "--out", str(tmp_path / "wrn.pth")]) == 0
    assert "block1.layer.0.bn1.running_var" in torch.load(tmp_path / "wrn.pth", weights_only=True)["model"]
    assert main(["export", str(run), "--format", "crd", "--network", "aux"]) == 2
    assert "choose --network among student, teacher" in capsys.readouterr().err


@pytest.mark.slow
def test_teacher_check_from_the_command_line(prepared_root: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    path, _ = crd_file(tmp_path / "teacher.pth", "resnet8", *DIGITS)
    command = [sys.executable, "-m", "reproduce", "teacher-check", "--params", str(PROJECT / "params.yaml"),
               "--set", f"dataset.prepared_root={prepared_root}", "--set", f"teacher.checkpoint={path}",
               "--set", "models.teacher=resnet8", "--set", "runtime.threads=1"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT), "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "not published, 12.50 % recorded in the checkpoint" in result.stdout


def test_a_recipe_distils_from_its_released_teacher_or_trains_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture) -> None:
    from reproduce.cli import main

    monkeypatch.chdir(tmp_path)  # no download_ckpts/ here
    recipe = ["recipe", str(PROJECT / "configs" / "papers" / "dkd_cifar100.yaml"), "--params",
              str(PROJECT / "params.yaml"), "--no-track"]
    assert main(recipe) == 2
    error = capsys.readouterr().err
    assert "download_ckpts/cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth not found" in error
    assert "--download" in error and "--set teacher.checkpoint=null trains the teacher first" in error
    assert main([*recipe, "--dry-run"]) == 0
    assert "methods: vanilla, kd, dkd" in capsys.readouterr().out  # no teacher to train
    assert main([*recipe, "--dry-run", "--set", "teacher.checkpoint=null"]) == 0
    assert "methods: teacher, vanilla, kd, dkd" in capsys.readouterr().out


@pytest.mark.slow
def test_a_run_records_the_teacher_it_distilled_from(prepared_root: Path, tmp_path: Path) -> None:
    from reproduce.train import RunSpec, train

    path, reference = crd_file(tmp_path / "teacher.pth", "resnet8", *DIGITS)
    config = tiny_config(prepared_root, tmp_path, recipe={"epochs": 1}, teacher={"checkpoint": str(path)})
    summary = train(config, RunSpec("kd", 0, tmp_path / "run", tmp_path / "checkpoints"), track=False)
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["teacher_source"]
    assert recorded == summary["teacher_source"] == load_pretrained("resnet8", path, *DIGITS).source.to_dict()
    assert recorded["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and recorded["layout"] == "crd"
