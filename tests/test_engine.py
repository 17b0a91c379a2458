"""The training engine: schedules, per-role updates, checkpoints and exact resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from reproduce.config import ConfigError, ScheduleConfig
from reproduce.train import CheckpointError, DivergedError, RunSpec, learning_rate, train


def _history(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "history.tsv") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


@pytest.mark.parametrize(("epoch", "fraction", "expected"), [
    (1, 0.0, 0.05), (150, 0.99, 0.05), (151, 0.0, 0.005), (181, 0.5, 0.0005), (240, 0.0, 0.00005)])
def test_step_schedule_decays_after_each_milestone_like_crd(epoch: int, fraction: float, expected: float) -> None:
    schedule = ScheduleConfig(name="step", milestones=[150, 180, 210], gamma=0.1)
    assert learning_rate(0.05, schedule, 240, epoch, fraction) == pytest.approx(expected)


def test_cosine_schedule_and_linear_warmup() -> None:
    cosine = ScheduleConfig(name="cosine", milestones=[], warmup_epochs=0)
    assert learning_rate(0.1, cosine, 10, 1, 0.0) == pytest.approx(0.1)
    assert learning_rate(0.1, cosine, 10, 6, 0.0) == pytest.approx(0.05)
    assert learning_rate(0.1, cosine, 10, 10, 1.0) == pytest.approx(0.0, abs=1e-12)
    warm = ScheduleConfig(name="step", milestones=[], warmup_epochs=2)
    assert learning_rate(0.1, warm, 10, 1, 0.5) == pytest.approx(0.025)
    assert learning_rate(0.1, warm, 10, 3, 0.0) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="recipe.schedule.name"):
        learning_rate(0.1, ScheduleConfig(name="linear"), 10, 1, 0.0)


@pytest.mark.slow  # a training run
def test_a_run_writes_best_and_last_side_by_side(prepared_root: Path, tmp_path: Path) -> None:
    config = tiny_config(prepared_root, tmp_path, recipe={"epochs": 3})
    spec = RunSpec("vanilla", 0, tmp_path / "runs" / "vanilla" / "seed0", tmp_path / "ckpt")
    summary = train(config, spec, track=False)
    on_disk = json.loads((spec.run_dir / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    history = _history(spec.run_dir)
    assert [int(row["epoch"]) for row in history] == [1, 2, 3]
    val = [float(row["val/student/top1"]) for row in history]
    assert summary["best"]["epoch"] == 1 + val.index(max(val))  # chosen on validation, never test
    assert summary["last"]["epoch"] == 3
    # the CPU kernels and threads the numbers were computed with (reproduce/numerics.py)
    assert summary["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert summary["environment"]["threads"] == 1
    best_row = history[summary["best"]["epoch"] - 1]
    assert summary["best"]["test"]["student"]["top1"] == pytest.approx(float(best_row["test/student/top1"]), rel=1e-5)
    assert float(history[0]["train/student/loss"]) > float(history[-1]["train/student/loss"])
    assert summary["last"]["test"]["student"]["top1"] > 50  # 10 classes: chance is 10%
    assert summary["selection"] == "val" and "best_test_selected" not in summary
    predictions = torch.load(spec.run_dir / "predictions.pt", weights_only=True)
    assert predictions["last"]["test"]["student"].shape == (len(predictions["labels"]["test"]), 10)
    for name in ("final.pt", "best.pt", "code.tar.gz", "history.tsv"):
        assert (spec.run_dir / name).exists()


@pytest.mark.slow  # a training run
def test_killed_and_resumed_run_matches_an_uninterrupted_one(prepared_root: Path, tmp_path: Path) -> None:
    """DML trains two networks with two optimisers: a good stress of what a checkpoint must hold."""
    config = tiny_config(prepared_root, tmp_path, recipe={"epochs": 3, "optimizer": {"lr": 0.1}},
                         dataset={"augment": {"crop_padding": 1, "flip": True}})
    straight = RunSpec("dml", 0, tmp_path / "straight", tmp_path / "ckpt-straight")
    resumed = RunSpec("dml", 0, tmp_path / "resumed", tmp_path / "ckpt-resumed")
    train(config, straight, track=False)
    assert train(config, resumed, stop_after_epoch=1, track=False) == {"stopped_after_epoch": 1}
    assert not (resumed.run_dir / "metrics.json").exists()
    train(config, resumed, resume="always", track=False)
    rows_a, rows_b = _history(straight.run_dir), _history(resumed.run_dir)
    assert len(rows_a) == len(rows_b) == 3
    for row_a, row_b in zip(rows_a, rows_b):
        for key in row_a:
            if not key.startswith("time/"):
                assert row_a[key] == row_b[key], f"epoch {row_a['epoch']}: {key} differs after resume"
    weights_a = torch.load(straight.run_dir / "final.pt", weights_only=True)["networks"]
    weights_b = torch.load(resumed.run_dir / "final.pt", weights_only=True)["networks"]
    for network in weights_a:
        for name, tensor in weights_a[network].items():
            assert torch.equal(tensor, weights_b[network][name]), f"{network}.{name} differs after resume"


@pytest.mark.slow  # a training run
def test_resume_auto_ignores_a_checkpoint_of_another_configuration(prepared_root: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    spec = RunSpec("vanilla", 0, tmp_path / "run", tmp_path / "ckpt")
    train(tiny_config(prepared_root, tmp_path, recipe={"epochs": 2}), spec, stop_after_epoch=1, track=False)
    changed = tiny_config(prepared_root, tmp_path, recipe={"epochs": 2, "optimizer": {"lr": 0.01}})
    with pytest.raises(ConfigError, match="different configuration"):
        train(changed, spec, resume="always", track=False)
    train(changed, spec, resume="auto", track=False)
    assert "starting from scratch" in capsys.readouterr().out
    assert [int(r["epoch"]) for r in _history(spec.run_dir)] == [1, 2]


@pytest.mark.slow  # a training run
def test_a_failure_mid_run_keeps_the_last_good_checkpoint(prepared_root: Path, tmp_path: Path) -> None:
    spec = RunSpec("vanilla", 0, tmp_path / "run", tmp_path / "ckpt")
    config = tiny_config(prepared_root, tmp_path, recipe={"epochs": 3})

    def crash(epoch: int, row: dict) -> None:
        if epoch == 2:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, spec, on_epoch_end=crash, track=False)
    assert not (spec.run_dir / "metrics.json").exists()  # no summary of a run that did not finish
    assert torch.load(spec.checkpoint_dir / "last.pt", weights_only=True)["epoch"] == 2
    assert not list(spec.checkpoint_dir.glob("*.tmp"))
    summary = train(config, spec, resume="always", track=False)
    assert summary["epochs"] == 3


@pytest.mark.slow  # a training run
def test_offline_method_without_teacher_says_how_to_train_it(prepared_root: Path, tmp_path: Path) -> None:
    config = tiny_config(prepared_root, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"dvc repro train@teacher"):
        train(config, RunSpec("kd", 0, tmp_path / "run", tmp_path / "ckpt"), track=False)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_bad_method_parameter_fails_before_any_output(prepared_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="methods.dml.temprature"):  # at load (reproduce.config), before any run
        tiny_config(prepared_root, tmp_path, methods={"dml": {"temprature": 2}})
    assert not (tmp_path / "run").exists() and not (tmp_path / "ckpt").exists()


@pytest.mark.slow  # a training run
def test_kd_distils_from_the_trained_teacher(prepared_root: Path, teacher_runs_root: Path, tmp_path: Path) -> None:
    config = tiny_config(prepared_root, tmp_path, teacher={"runs_root": str(teacher_runs_root)})
    summary = train(config, RunSpec("kd", 0, tmp_path / "run", tmp_path / "ckpt"), track=False)
    teacher_summary = json.loads((teacher_runs_root / "seed0" / "metrics.json").read_text())
    # The frozen teacher is evaluated too, and is exactly the trained one.
    assert summary["last"]["test"]["teacher"]["top1"] == pytest.approx(teacher_summary["last"]["test"]["teacher"]["top1"])
    assert summary["last"]["test"]["student"]["top1"] > 30


@pytest.mark.slow  # a training run
@pytest.mark.parametrize("method, cached", [("kd", {"teacher"}), ("dml", set())])
def test_only_networks_that_cannot_change_are_evaluated_once(prepared_root: Path, teacher_runs_root: Path,
                                                              tmp_path: Path, method: str, cached: set[str]) -> None:
    from reproduce.data.loader import make_loaders
    from reproduce.data.prepare import load_prepared
    from reproduce.runtime import resolve_runtime
    from reproduce.train.build import make_networks
    from reproduce.train.evaluate import evaluate
    from reproduce.methods.base import build_method

    config = tiny_config(prepared_root, tmp_path, teacher={"runs_root": str(teacher_runs_root)})
    runtime = resolve_runtime(config.runtime)
    prepared = load_prepared(config.dataset.prepared_dir)
    _, splits = make_loaders(prepared, config.dataset, batch_size=64, eval_batch_size=128, device=runtime.device,
                             seed=0, channels_last=False, num_workers=0, rank=0, world_size=1)
    built = build_method(config, method, make_networks(config, prepared.num_classes, prepared.in_channels, runtime.device))
    forwards = {name: 0 for name in built.eval_networks()}
    for name, network in built.eval_networks().items():
        network.register_forward_hook(lambda *_, name=name: forwards.__setitem__(name, forwards[name] + 1))
    cache: dict = {}
    first, _, _ = evaluate(built, splits, runtime, cache)
    after_first = dict(forwards)
    second, _, _ = evaluate(built, splits, runtime, cache)
    repeated = {name for name in forwards if forwards[name] > after_first[name]}
    assert repeated == set(forwards) - cached and all(after_first.values())
    assert second == first == evaluate(built, splits, runtime)[0]  # the cache changes no number


@pytest.fixture(scope="module")
def prepared_without_validation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from reproduce.data.prepare import prepare

    root = tmp_path_factory.mktemp("prepared-full")
    prepare("digits", root / "raw", root, val_fraction=0, split_seed=0, progress=False)
    return root


@pytest.mark.slow  # a training run
def test_without_a_validation_split_the_best_epoch_is_chosen_on_test_and_named_so(
        prepared_without_validation: Path, tmp_path: Path) -> None:
    """The papers' protocol: the whole training set trains, the best epoch is max test top-1."""
    manifest = json.loads((prepared_without_validation / "digits" / "manifest.json").read_text())
    assert manifest["counts"]["val"] == 0 and manifest["counts"]["train"] == 1346  # 1145 + 201 of the 0.15 split
    config = tiny_config(prepared_without_validation, tmp_path, recipe={"epochs": 3}, dataset={"val_fraction": 0})
    spec = RunSpec("vanilla", 0, tmp_path / "run", tmp_path / "ckpt")
    summary = train(config, spec, track=False)
    history = _history(spec.run_dir)
    assert not any(key.startswith("val/") for key in history[0])
    test = [float(row["test/student/top1"]) for row in history]
    assert summary["selection"] == "test" and "best" not in summary
    assert summary["best_test_selected"]["epoch"] == 1 + test.index(max(test))
    assert set(summary["best_test_selected"]) == {"epoch", "test"} and set(summary["last"]) == {"epoch", "test"}
    assert torch.load(spec.run_dir / "predictions.pt", weights_only=True)["selection"] == "test"


def test_a_nan_loss_stops_the_run_naming_epoch_step_method_and_term(prepared_root: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from reproduce.methods import get_method

    dml = get_method("dml")
    original = dml.step

    def diverging(self, x, y, epoch):
        step = original(self, x, y, epoch)
        if epoch == 2:
            step.losses["student"]["kd"] = step.losses["student"]["kd"] * float("nan")
        return step

    monkeypatch.setattr(dml, "step", diverging)
    spec = RunSpec("dml", 0, tmp_path / "run", tmp_path / "ckpt")
    with pytest.raises(DivergedError, match=r"epoch 2, step 1: method dml, role student, loss term 'kd' is nan"):
        train(tiny_config(prepared_root, tmp_path, recipe={"epochs": 3}), spec, track=False)
    assert torch.load(spec.checkpoint_dir / "last.pt", weights_only=True)["epoch"] == 1  # the last good one
    assert not (spec.run_dir / "metrics.json").exists()


class _Payload:
    """Unpickling this would run code: the engine must refuse it."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_a_crafted_checkpoint_is_refused_and_runs_no_code(prepared_root: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = RunSpec("vanilla", 0, tmp_path / "run", tmp_path / "ckpt")
    spec.checkpoint_dir.mkdir(parents=True)
    torch.save({"format": 3, "payload": _Payload()}, spec.checkpoint_dir / "last.pt")
    with pytest.raises(CheckpointError, match=r"last\.pt: refused to load this checkpoint.*--resume never"):
        train(tiny_config(prepared_root, tmp_path), spec, track=False)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.slow  # a training run
def test_a_truncated_checkpoint_names_the_file_and_the_fix(prepared_root: Path, tmp_path: Path) -> None:
    config = tiny_config(prepared_root, tmp_path, recipe={"epochs": 2})
    spec = RunSpec("vanilla", 0, tmp_path / "run", tmp_path / "ckpt")
    train(config, spec, stop_after_epoch=1, track=False)
    checkpoint = spec.checkpoint_dir / "last.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"last\.pt: this checkpoint is corrupt or truncated.*--resume never"):
        train(config, spec, track=False)
    assert train(config, spec, resume="never", track=False)["epochs"] == 2


@pytest.mark.slow  # a training run
def test_a_crafted_teacher_file_is_refused(prepared_root: Path, tmp_path: Path) -> None:
    teacher = tmp_path / "teacher-runs" / "seed0" / "final.pt"
    teacher.parent.mkdir(parents=True)
    torch.save({"models": {"teacher": "resnet8"}, "networks": _Payload()}, teacher)
    with pytest.raises(ConfigError, match=r"final\.pt: refused to load"):  # the teacher is loaded as data only
        train(tiny_config(prepared_root, tmp_path), RunSpec("kd", 0, tmp_path / "run", tmp_path / "ckpt"), track=False)


@pytest.mark.slow  # a training run
def test_a_finished_run_says_it_is_done_instead_of_training_again(prepared_root: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    config = tiny_config(prepared_root, tmp_path, recipe={"epochs": 1})
    spec = RunSpec("vanilla", 0, tmp_path / "run", tmp_path / "ckpt")
    first = train(config, spec, track=False)
    again = train(config, spec, track=False)
    assert "already done" in capsys.readouterr().out and again == json.loads(json.dumps(first))


def test_learning_rates_are_looked_up_per_step_from_the_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step's rate is ``learning_rate`` at that point of the run, and no step rebuilds a config object."""
    from reproduce.config import RecipeConfig
    from reproduce.train import LearningRates

    recipe = tiny_config(Path("."), Path("."), recipe={"epochs": 4, "roles": {"teacher": {"lr": 0.2}},
                                                      "schedule": {"name": "cosine", "warmup_epochs": 1}}).recipe
    rates = LearningRates.for_recipe(recipe, ["student", "teacher"], steps_per_epoch=5)
    optimizers = {role: torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0) for role in ("student", "teacher")}
    built = []
    monkeypatch.setattr(RecipeConfig, "optimizer_for", lambda self, role: built.append(role))
    for epoch in range(1, 5):
        for index in range(5):
            rates.apply(optimizers, epoch, index)
            for role, base in (("student", 0.05), ("teacher", 0.2)):
                expected = learning_rate(base, recipe.schedule, 4, epoch, index / 5)
                assert optimizers[role].param_groups[0]["lr"] == expected
    assert built == []
    assert rates.last_of_epoch(2) == {"student": learning_rate(0.05, recipe.schedule, 4, 2, 0.8),
                                      "teacher": learning_rate(0.2, recipe.schedule, 4, 2, 0.8)}


def test_the_background_writer_writes_off_the_training_thread_and_reports_its_errors() -> None:
    import threading

    from reproduce.train.checkpoint import BackgroundWriter

    writer, threads = BackgroundWriter(), []
    writer.submit(lambda: threads.append(threading.current_thread()))
    writer.wait()
    assert threads and threads[0] is not threading.current_thread()

    def failing() -> None:
        raise OSError("disk full")

    writer.submit(failing)
    with pytest.raises(OSError, match="disk full"):
        writer.submit(lambda: None)  # the next submit waits for the failed job and raises its error
    writer.submit(failing)
    writer.wait(raise_error=False)  # on the way out of a failed run: the run's own error wins
    writer.wait()


@pytest.mark.slow
def test_evaluation_every_k_epochs_and_always_the_last(prepared_root: Path, tmp_path: Path) -> None:
    config = tiny_config(prepared_root, tmp_path, recipe={"epochs": 5, "eval_every": 2})
    spec = RunSpec("vanilla", 0, tmp_path / "run", tmp_path / "ckpt")
    summary = train(config, spec, track=False)
    history = _history(spec.run_dir)
    evaluated = [int(row["epoch"]) for row in history if row["test/student/top1"]]
    assert [int(row["epoch"]) for row in history] == [1, 2, 3, 4, 5] and evaluated == [2, 4, 5]
    assert all(row["train/student/loss"] for row in history)  # every epoch still trains and is recorded
    val = {int(row["epoch"]): float(row["val/student/top1"]) for row in history if row["val/student/top1"]}
    assert summary["best"]["epoch"] == max(val, key=val.get) and summary["last"]["epoch"] == 5


@pytest.mark.slow
def test_a_compiled_run_matches_the_eager_run_and_compiles_only_in_its_first_epoch(prepared_root: Path,
                                                                                    tmp_path: Path) -> None:
    """``runtime.compile: on`` end to end with Inductor: the step and evaluation compiled apart, the same
    numbers as the eager run within float32 rounding, and no graph compiled after the first epoch."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    graphs: list[int] = []
    eager = RunSpec("vanilla", 0, tmp_path / "eager", tmp_path / "ckpt-eager")
    compiled = RunSpec("vanilla", 0, tmp_path / "compiled", tmp_path / "ckpt-compiled")
    train(tiny_config(prepared_root, tmp_path, recipe={"epochs": 2}), eager, track=False)
    train(tiny_config(prepared_root, tmp_path, recipe={"epochs": 2}, runtime={"compile": "on"}), compiled, track=False,
          on_epoch_end=lambda epoch, row: graphs.append(counters["stats"]["unique_graphs"]))
    assert graphs[0] > 0 and graphs[1] == graphs[0], f"graphs compiled by the end of each epoch: {graphs}"
    for expected, actual in zip(_history(eager.run_dir), _history(compiled.run_dir)):
        for key in ("train/student/loss", "val/student/nll", "test/student/nll"):
            assert float(actual[key]) == pytest.approx(float(expected[key]), rel=1e-3), key
        assert abs(float(actual["test/student/top1"]) - float(expected["test/student/top1"])) <= 1.0
