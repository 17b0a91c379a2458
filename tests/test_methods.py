"""The distillation methods: their training step, options and invariants, one engine step, and a
short real training run of each on the embedded digits dataset."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from reproduce import models
from reproduce.augment import AUGMENTATIONS
from reproduce.engine import RunSpec, Runtime, _train_epoch, make_optimizer, train
from reproduce.losses import dkd_parts, kd_loss, reverse_kd_loss, target_log_probability
from reproduce.methods import Method, Networks, get_method
from reproduce.methods.base import ConfigError
from reproduce.methods.bdkd import FORWARD_WEIGHTINGS
from tests.conftest import tiny_config

CLASSES, CHANNELS, BATCH = 10, 1, 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def networks(teacher: str = "resnet8", student: str = "resnet8") -> Networks:
    def create(arch: str) -> nn.Module:
        return models.create(arch, CLASSES, in_channels=CHANNELS)

    return Networks(teacher, student, CLASSES, CHANNELS, create, lambda: create(teacher).requires_grad_(False).eval())


def build(name: str, **params: Any) -> Method:
    torch.manual_seed(0)
    method = get_method(name)
    return method(networks(), method.parse_params(params)).train()


def batch(seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(BATCH, CHANNELS, 8, 8, generator=generator)
    return images, torch.randint(0, CLASSES, (BATCH,), generator=generator)


def constant_output(network: nn.Module, probabilities: list[float]) -> None:
    """Make a SplitNet output the same logits for every input (its trunk and BN still run)."""
    logits = torch.tensor(probabilities).clamp_min(1e-30).log()
    with torch.no_grad():
        network.classifier.weight.zero_()
        network.classifier.bias.copy_(logits)


def total_loss(step: Any, role: str) -> Tensor:
    return sum(step.losses[role].values())


def grads_are_none(module: nn.Module) -> bool:
    return all(parameter.grad is None for parameter in module.parameters())


def has_grads(module: nn.Module) -> bool:
    return any(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in module.parameters())


# -- options are validated ------------------------------------------------------------------------


@pytest.mark.parametrize("name, bad", [
    ("aekt", {"head": "diagonal"}), ("aekt", {"explicit_weighting": "square"}), ("bdkd", {"weighting": "soft"}),
    ("bdkd", {"teacher_reg": "forward"}), ("switokd", {"eps_form": "figure"}), ("sokd", {"aux_init": "zeros"}),
    ("sokd", {"frozen_bn": "off"}), ("r2kd", {"augmentation": "autoaugment"}), ("r2kd", {"rank_gradient": "hard"}),
    ("r2kd", {"pruned_teacher_mode": "frozen"}), ("dkd", {"warmup_epochs": 0}), ("dkd", {"temprature": 4.0}),
])
def test_bad_options_name_their_key(name: str, bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=f"methods.{name}.{next(iter(bad))}"):
        get_method(name).parse_params(bad)


# -- DKD and AEKT ---------------------------------------------------------------------------------


def test_dkd_warmup_ramps_the_distillation_term() -> None:
    method = build("dkd", warmup_epochs=4)
    x, y = batch()
    kd = [method.step(x, y, epoch).losses["student"]["dkd"].item() for epoch in (1, 2, 4, 9)]
    assert kd[1] == pytest.approx(2 * kd[0], rel=1e-4)
    assert kd[2] == pytest.approx(4 * kd[0], rel=1e-4)
    assert kd[3] == pytest.approx(kd[2], rel=1e-4)


def test_aekt_with_g_one_is_dkd_with_alpha_gamma() -> None:
    aekt = build("aekt", explicit_weighting="one", gamma=1.7, beta=5.0, warmup_epochs=3)
    dkd = build("dkd", alpha=1.7, beta=5.0, warmup_epochs=3)
    dkd.student.load_state_dict(aekt.student.state_dict())
    dkd.teacher.load_state_dict(aekt.teacher.state_dict())
    x, y = batch()
    for epoch in (1, 5):
        assert total_loss(aekt.step(x, y, epoch), "student").item() == pytest.approx(
            total_loss(dkd.step(x, y, epoch), "student").item(), rel=1e-5)


def test_aekt_serial_head_starts_as_identity() -> None:
    method = build("aekt")
    torch.testing.assert_close(method.distill_head.weight, torch.eye(CLASSES))
    assert method.distill_head.bias.abs().sum() == 0
    x = batch()[0]
    torch.testing.assert_close(method.distill_head(method.student(x)), method.student(x))
    assert set(method.eval_networks()) == {"student", "teacher"} and method.eval_networks()["student"] is method.student


def test_aekt_ratio_weights_tckd_and_is_clipped() -> None:
    x, y = batch()
    method = build("aekt", warmup_epochs=1, gamma=2.0)
    step = method.step(x, y, 1)
    with torch.no_grad():
        teacher_logits, student_logits = method.teacher(x), method.student(x)
        tckd, _ = dkd_parts(student_logits, teacher_logits, y, 4.0)
        ratio = (target_log_probability(teacher_logits, y, 4.0) - target_log_probability(student_logits, y, 4.0)).exp()
    expected = 4.0**2 * 2.0 * (ratio.clamp(0, 10) * tckd).mean()  # τ²·γ·mean(r·TCKD)
    assert step.losses["student"]["explicit"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert float(step.signals["ratio"]) == pytest.approx(ratio.clamp(0, 10).mean().item(), rel=1e-4)
    clipped = build("aekt", max_ratio=1e-3).step(x, y, 1)
    assert ratio.min().item() > 1e-3 and float(clipped.signals["ratio"]) == pytest.approx(1e-3)  # all clipped


def test_aekt_parallel_head_reads_features_and_trains_with_the_student() -> None:
    method = build("aekt", head="parallel", warmup_epochs=1)
    assert method.distill_head.in_features == method.student.classifier.in_features
    role = method.roles()["student"]
    total_loss(method.step(*batch(), 1), "student").backward()
    assert has_grads(method.distill_head) and has_grads(method.student.trunk)
    assert len(make_optimizer(role, tiny_config(Path("."), Path(".")).recipe.optimizer).param_groups[0]["params"]) == \
        len(list(method.student.parameters())) + 2


def test_aekt_saves_the_serial_head_as_an_image(tmp_path: Path) -> None:
    artefacts = build("aekt").end_of_training(tmp_path)
    assert artefacts["aekt_fc_ser"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert build("aekt", head="parallel").end_of_training(tmp_path) == {}


# -- BD-KD ----------------------------------------------------------------------------------------


def test_bdkd_weights_are_in_unit_interval() -> None:
    generator = torch.Generator().manual_seed(0)
    h_s, h_t = 3 * torch.rand(200, generator=generator), 3 * torch.rand(200, generator=generator)
    for rule in FORWARD_WEIGHTINGS.values():
        weight = rule(h_s, h_t, 2.0)
        assert weight.min() >= 0 and weight.max() <= 1


def test_bdkd_weighting_rules_by_hand() -> None:
    h_s, h_t = torch.tensor([0.5, 2.0, 1.0]), torch.tensor([1.5, 1.0, 1.0])
    torch.testing.assert_close(FORWARD_WEIGHTINGS["entropy_ratio"](h_s, h_t, 1.0), torch.tensor([0.75, 1 / 3, 0.5]))
    torch.testing.assert_close(FORWARD_WEIGHTINGS["hard"](h_s, h_t, 1.0), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(FORWARD_WEIGHTINGS["sigmoid"](h_s, h_t, 2.0),
                               torch.tensor([1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(2.0)), 0.5]))


def test_bdkd_entropy_ratio_grows_with_the_entropy_gap() -> None:
    """Documented direction: the more confident the student relative to the teacher (H_t − H_s up),
    the more weight on the forward (mass-covering) KL."""
    h_t = torch.full((5,), 1.2)
    h_s = torch.tensor([2.0, 1.5, 1.2, 0.8, 0.1])  # H_t − H_s increasing
    weight = FORWARD_WEIGHTINGS["entropy_ratio"](h_s, h_t, 1.0)
    assert (weight.diff() > 0).all() and weight[2] == pytest.approx(0.5)


def bdkd_with_sharp_student(**params: Any) -> Method:
    method = build("bdkd", **params)
    constant_output(method.student, [0.91] + [0.01] * 9)  # H_s < H_t for every sample
    constant_output(method.teacher, [0.4] + [1 / 15] * 9)
    return method


def test_bdkd_student_loss_is_fkl_at_w_one_and_rkl_at_w_zero() -> None:
    x, y = batch()
    for flip, divergence in ((False, kd_loss), (True, reverse_kd_loss)):
        method = bdkd_with_sharp_student(weighting="hard", flip=flip, student_kd_weight=0.7, temperature=2.0)
        step = method.step(x, y, 1)
        assert float(step.signals["forward_weight"]) == (0.0 if flip else 1.0)
        with torch.no_grad():
            student_logits, teacher_logits = method.student(x), method.teacher(x)
        expected = 0.7 * divergence(student_logits, teacher_logits, 2.0)
        assert step.losses["student"]["kd"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_bdkd_flip_swaps_the_weights() -> None:
    x, y = batch()
    weight = float(bdkd_with_sharp_student().step(x, y, 1).signals["forward_weight"])
    flipped = float(bdkd_with_sharp_student(flip=True).step(x, y, 1).signals["forward_weight"])
    assert weight > 0.5 and flipped == pytest.approx(1 - weight)


@pytest.mark.parametrize("teacher_reg, divergence", [("dml", kd_loss), ("reverse", reverse_kd_loss)])
def test_bdkd_teacher_regulariser(teacher_reg: str, divergence: Any) -> None:
    method = build("bdkd", teacher_reg=teacher_reg, teacher_kd_weight=0.5, temperature=3.0)
    x, y = batch()
    step = method.step(x, y, 1)
    with torch.no_grad():
        expected = 0.5 * divergence(method.teacher(x), method.student(x), 3.0)
    assert step.losses["teacher"]["kd"].item() == pytest.approx(expected.item(), rel=1e-5)


# -- SwitOKD --------------------------------------------------------------------------------------

UNIFORM = [0.1] * 10
TEACHER_RIGHT = [0.7, 0.3] + [0.0] * 8  # label 0: t = 0.6 against the uniform student's s = 1.8


def switokd_with(teacher_probs: list[float], student_probs: list[float], **params: Any) -> Method:
    method = build("switokd", **params)
    constant_output(method.teacher, teacher_probs)
    constant_output(method.student, student_probs)
    return method


@pytest.mark.parametrize("teacher_probs, student_probs, requires_better, expert", [
    (TEACHER_RIGHT, UNIFORM, True, True),  # G = 1.6 > δ = 1.33, t < s
    (TEACHER_RIGHT, TEACHER_RIGHT, True, False),  # G = 0 ≤ δ
    (UNIFORM, TEACHER_RIGHT, True, False),  # G > δ but the teacher is worse (t > s)
    (UNIFORM, TEACHER_RIGHT, False, True),  # ... which the paper's rule ignores
])
def test_switokd_mode_truth_table(teacher_probs: list[float], student_probs: list[float], requires_better: bool,
                                  expert: bool) -> None:
    method = switokd_with(teacher_probs, student_probs, expert_requires_teacher_better=requires_better)
    x = batch()[0]
    step = method.step(x, torch.zeros(BATCH, dtype=torch.long), 1)
    assert step.signals["expert_fraction"] == float(expert)
    assert (step.signals["gap"] > step.signals["threshold"]) == (teacher_probs != student_probs)
    if expert:
        assert step.update == frozenset({"student"}) and set(step.losses) == {"student"}
    else:
        assert step.update is None and set(step.losses) == {"teacher", "student"}


class OneBatch:
    """The engine's Batches protocol over one fixed batch."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return 1

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        yield self.x, self.y


def engine_step(method: Method, tmp_path: Path) -> dict[str, torch.optim.Optimizer]:
    """One step through the engine's own loop (zero_grad, step, backward of updated roles, optimiser steps)."""
    config = tiny_config(tmp_path, tmp_path, recipe={"optimizer": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}})
    optimizers = {role: make_optimizer(module, config.recipe.optimizer_for(role))
                  for role, module in method.roles().items()}
    runtime = Runtime(torch.device("cpu"), None, channels_last=False, compile=False)
    _train_epoch(method, optimizers, OneBatch(batch()[0], torch.zeros(BATCH, dtype=torch.long)), 1, config, runtime)
    return optimizers


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def changed(before: dict[str, Tensor], module: nn.Module, kind: str) -> bool:
    """Whether any parameter (kind "param") or BN running statistic (kind "running") moved."""
    after = module.state_dict()
    names = [n for n in before if ("running" in n) == (kind == "running") and "num_batches" not in n]
    return any(not torch.equal(before[n], after[n]) for n in names)


def test_switokd_expert_mode_leaves_the_teacher_untouched_but_its_bn_statistics(tmp_path: Path) -> None:
    method = switokd_with(TEACHER_RIGHT, UNIFORM)
    teacher_before, student_before = snapshot(method.teacher), snapshot(method.student)
    optimizers = engine_step(method, tmp_path)
    assert not changed(teacher_before, method.teacher, "param")  # no gradient step, no weight decay
    assert optimizers["teacher"].state == {}  # no momentum buffer was ever created
    assert changed(teacher_before, method.teacher, "running")  # train() mode: BN still tracks the batches
    assert changed(student_before, method.student, "param")
    assert all(torch.is_tensor(state["momentum_buffer"]) for state in optimizers["student"].state.values())


def test_switokd_learning_mode_updates_both(tmp_path: Path) -> None:
    method = switokd_with(TEACHER_RIGHT, TEACHER_RIGHT)
    teacher_before = snapshot(method.teacher)
    optimizers = engine_step(method, tmp_path)
    assert changed(teacher_before, method.teacher, "param") and optimizers["teacher"].state


# -- Every online method detaches its peers -------------------------------------------------------


@pytest.mark.parametrize("name, roles", [
    ("bdkd", ("teacher", "student")), ("switokd", ("teacher", "student")), ("dml", ("teacher", "student")),
    ("sokd", ("aux", "student")),
])
def test_each_role_loss_reaches_only_its_own_network(name: str, roles: tuple[str, str]) -> None:
    for own, peer in (roles, roles[::-1]):
        method = build(name)
        if name == "switokd":  # learning mode, where both losses exist
            constant_output(method.teacher, TEACHER_RIGHT)
            constant_output(method.student, TEACHER_RIGHT)
        x, y = batch()
        step = method.step(x, torch.zeros_like(y) if name == "switokd" else y, 1)
        total_loss(step, own).backward()
        assert all(p.grad is None for p in trainable(method, peer)), f"{own}'s loss leaked into {peer}"
        assert any(p.grad is not None for p in trainable(method, own))


def trainable(method: Method, role: str) -> list[nn.Parameter]:
    return [parameter for parameter in method.roles()[role].parameters() if parameter.requires_grad]


# -- SOKD -----------------------------------------------------------------------------------------


def test_sokd_gradients_reach_only_the_branch_and_the_student() -> None:
    method = build("sokd")
    step = method.step(*batch(), 1)
    (total_loss(step, "aux") + total_loss(step, "student")).backward()
    assert grads_are_none(method.teacher)  # trunk and head of T
    assert has_grads(method.aux.head) and has_grads(method.student)
    assert method.aux.trunk is method.teacher.trunk
    optimizer = make_optimizer(method.roles()["aux"], tiny_config(Path("."), Path(".")).recipe.optimizer)
    assert len(optimizer.param_groups[0]["params"]) == len(list(method.aux.head.parameters()))


def test_sokd_student_learns_from_the_branch_not_the_teacher() -> None:
    method = build("sokd")
    x, y = batch()

    def student_kd() -> float:
        return method.step(x, y, 1).losses["student"]["kd"].item()

    before = student_kd()
    with torch.no_grad():
        method.teacher.classifier.weight.mul_(-3.0)  # T's own head changes ...
    assert student_kd() == pytest.approx(before, rel=1e-6)  # ... the student's target does not
    with torch.no_grad():
        method.aux.classifier.weight.mul_(-3.0)
    assert student_kd() != pytest.approx(before, rel=1e-3)


def test_sokd_options() -> None:
    teacher_copy = build("sokd", aux_init="teacher")
    pairs = zip(teacher_copy.aux.head.parameters(), teacher_copy.teacher.head.parameters(), strict=True)
    for branch, original in pairs:
        assert torch.equal(branch, original) and branch.requires_grad and not original.requires_grad
    random_init = build("sokd")
    assert not torch.equal(random_init.aux.classifier.weight, random_init.teacher.classifier.weight)
    assert random_init.teacher.training  # frozen_bn train: the code's quirk
    evaluated = build("sokd", frozen_bn="eval")
    assert not evaluated.teacher.training and not evaluated.aux.trunk.training and evaluated.aux.head.training
    assert set(random_init.eval_networks()) == {"teacher", "aux", "student"}


# -- R2KD -----------------------------------------------------------------------------------------


def test_r2kd_prunes_ten_percent_of_every_weight_tensor() -> None:
    method = build("r2kd")
    teacher, pruned = method.teacher, method.pruned_teacher
    layers = 0
    for (name, original), copy_ in zip(teacher.named_modules(), pruned.modules(), strict=True):
        if isinstance(original, (nn.Conv2d, nn.Linear)):
            layers += 1
            zeros = copy_.weight == 0
            assert int(zeros.sum()) == round(0.1 * original.weight.numel()), name
            assert (original.weight != 0).all()  # the teacher itself is untouched
            kept = ~zeros
            assert torch.equal(copy_.weight[kept], original.weight[kept])
            assert original.weight[zeros].abs().max() <= original.weight[kept].abs().min()  # the smallest go
            if original.bias is not None:
                assert torch.equal(copy_.bias, original.bias)
        elif isinstance(original, nn.BatchNorm2d):
            for key, value in original.state_dict().items():
                assert torch.equal(copy_.state_dict()[key], value)
    assert layers >= 8
    assert 0.09 < method.pruned_sparsity < 0.11


def test_r2kd_rank_term_has_a_gradient_only_when_soft() -> None:
    x, y = batch()
    code_faithful = build("r2kd").step(x, y, 1)
    assert not code_faithful.losses["student"]["rank"].requires_grad
    assert code_faithful.losses["student"]["value"].requires_grad
    soft = build("r2kd", rank_gradient="soft")
    soft.step(x, y, 1).losses["student"]["rank"].backward()
    assert has_grads(soft.student)


def test_r2kd_kd_terms_cover_the_augmented_view() -> None:
    x, y = batch()
    torch.manual_seed(3)
    clean_only = build("r2kd", augmentation="none").step(x, y, 1).losses["student"]
    torch.manual_seed(3)
    both = build("r2kd").step(x, y, 1).losses["student"]
    assert both["value"].item() > clean_only["value"].item()
    assert both["ce"].item() == pytest.approx(clean_only["ce"].item(), rel=1e-6)  # CE on the clean batch only


def test_r2kd_teacher_modes() -> None:
    code_mode, eval_mode = build("r2kd"), build("r2kd", pruned_teacher_mode="eval")
    assert code_mode.pruned_teacher.training and not code_mode.teacher.training
    assert not eval_mode.pruned_teacher.training
    assert set(code_mode.eval_networks()) == {"student", "teacher", "pruned_teacher"}


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_augmentations_are_batched_and_follow_the_global_rng(name: str) -> None:
    images = torch.randn(8, 3, 32, 32)
    torch.manual_seed(0)
    first = AUGMENTATIONS[name](images)
    torch.manual_seed(0)
    again = AUGMENTATIONS[name](images)
    assert first.shape == images.shape and torch.equal(first, again) and not torch.equal(first, images)


def test_cutout_zeroes_one_box_per_batch() -> None:
    torch.manual_seed(1)
    holed = AUGMENTATIONS["cutout"](torch.ones(4, 3, 32, 32))
    holes = holed == 0
    assert torch.equal(holes, holes[:1].expand_as(holes))  # the code's one box for the whole batch
    assert 0 < int(holes[0, 0].sum()) <= 64


# -- Short real training runs on digits -----------------------------------------------------------


def read_history(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "history.tsv") as table:
        return list(csv.DictReader(table, delimiter="\t"))


TRAINING = [  # (method, params, distils from the pre-trained teacher, signals it logs)
    ("dkd", {"warmup_epochs": 1}, True, set()),
    ("aekt", {"warmup_epochs": 1}, True, {"ratio"}),
    ("r2kd", {}, True, {"loss_value", "loss_rank", "pruned_sparsity"}),
    ("sokd", {}, True, set()),
    ("bdkd", {}, False, {"forward_weight", "student_entropy", "teacher_entropy"}),
    ("switokd", {}, False, {"expert_fraction", "gap", "threshold", "epsilon"}),
]


@pytest.mark.parametrize("name, params, offline, signals", TRAINING, ids=[t[0] for t in TRAINING])
def test_training_lowers_the_loss_and_the_student_learns(name: str, params: dict[str, Any], offline: bool,
                                                         signals: set[str], prepared_root: Path,
                                                         teacher_runs_root: Path, tmp_path: Path) -> None:
    # One intra-op thread: on a shared, oversubscribed CPU two spinning threads run several times slower.
    sections: dict[str, Any] = {"recipe": {"epochs": 3}, "methods": {name: params}, "runtime": {"threads": 1}}
    if offline:
        sections["teacher"] = {"runs_root": str(teacher_runs_root)}
    config = tiny_config(prepared_root, tmp_path, **sections)
    spec = RunSpec(name, 0, tmp_path / "runs" / name / "seed0", tmp_path / "checkpoints")
    summary = train(config, spec, track=False)
    history = read_history(spec.run_dir)
    first, last = float(history[0]["train/student/loss"]), float(history[-1]["train/student/loss"])
    assert last < first
    assert summary["last"]["test"]["student"]["top1"] > 40.0  # chance is 10%
    assert set(summary["signals"]) == signals
