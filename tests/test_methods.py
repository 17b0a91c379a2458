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
import torch.nn.functional as F
from torch import Tensor, nn

import reproduce.methods.r2kd as r2kd
import reproduce.methods.switokd as switokd
from reproduce import models
from reproduce.data.augment import AUGMENTATIONS
from reproduce.runtime import Runtime
from reproduce.train import LearningRates, RunSpec, make_optimizer, train, train_epoch
from reproduce.losses import dkd_parts, forward_kl_per_sample, kd_loss, reverse_kd_loss, target_log_probability
from reproduce.methods import Method, MethodKind, Networks, get_method
from reproduce.methods.base import ConfigError, registered
from reproduce.methods.bdkd import FORWARD_WEIGHTINGS
from reproduce.methods.r2kd import (
    correlation_distance,
    correlation_value_loss,
    hard_ranks,
    rank_loss,
    soft_ranks,
    spearman_correlation,
)
from reproduce.methods.switokd import gap_threshold, threshold
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


def random_logits(seed: int, batch: int = 6, classes: int = 7, scale: float = 3.0) -> Tensor:
    return scale * torch.randn(batch, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


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
    ("kdcl", {"ensemble": "general"}), ("kdcl", {"linear_objective": "ridge"}), ("kdcl", {"extra_students": -1}),
    ("switokd", {"temperature_squared": "yes"}),
])
def test_bad_options_name_their_key(name: str, bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=f"methods.{name}.{next(iter(bad))}"):
        get_method(name).parse_params(bad)


# -- registry declarations ------------------------------------------------------------------------

TABLE_ROWS = {"teacher": 0, "vanilla": 1, "kd": 10, "dkd": 11, "dml": 20, "kdcl": 21, "bdkd": 30, "aekt": 31,
              "switokd": 32, "sokd": 33, "r2kd": 34}


def test_every_method_declares_its_name_row_and_space() -> None:
    from sweeps.space import parse_space

    assert {cls.name: cls.row_order for cls in registered()} == TABLE_ROWS
    assert [cls.name for cls in registered()] == sorted(TABLE_ROWS, key=TABLE_ROWS.get)
    for cls in registered():
        assert isinstance(cls.display_name, str) and cls.display_name, cls.name
        assert set(parse_space(cls.search_space, cls.name, None)) == set(cls.search_space)  # a valid space
    assert get_method("teacher").display_name == "Teacher (vanilla)" and get_method("kdcl").display_name == "KDCL"
    assert get_method("teacher").search_space == get_method("vanilla").search_space == {}
    assert "rank_weight" not in get_method("r2kd").search_space  # no gradient with the code's argsort ranks


@pytest.mark.parametrize("name, role, arch", [("teacher", "teacher", "resnet14"), ("vanilla", "student", "resnet8")])
def test_teacher_and_vanilla_train_one_network_of_their_role(name: str, role: str, arch: str) -> None:
    torch.manual_seed(0)
    method_cls = get_method(name)
    method = method_cls(networks(teacher="resnet14", student="resnet8"), method_cls.parse_params({})).train()
    assert method_cls.primary == role and set(method.roles()) == {role} == set(method.eval_networks())
    assert method_cls.kind is MethodKind.STANDALONE
    reference = models.create(arch, CLASSES, in_channels=CHANNELS)
    assert [p.shape for p in method.roles()[role].parameters()] == [p.shape for p in reference.parameters()]
    x, y = batch()
    step = method.step(x, y, 1)
    assert set(step.losses) == {role} and step.update is None
    expected = torch.nn.functional.cross_entropy(method.roles()[role](x), y)
    assert step.losses[role]["ce"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_vanilla_has_no_network_option() -> None:
    with pytest.raises(ConfigError, match="methods.vanilla.network"):
        get_method("vanilla").parse_params({"network": "teacher"})


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


@pytest.mark.parametrize("seed", range(40))
def test_switokd_epsilon_and_threshold_bounds(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    scale = float(torch.empty(()).uniform_(0.1, 8.0, generator=generator))
    student = scale * torch.randn(16, 10, generator=generator)
    teacher = scale * torch.randn(16, 10, generator=generator)
    target = torch.randint(0, 10, (16,), generator=generator)
    gap, delta, epsilon = gap_threshold(student, teacher, target)
    one_hot = F.one_hot(target, 10).float()
    s = (F.softmax(student, 1) - one_hot).abs().sum(1).mean().item()
    t = (F.softmax(teacher, 1) - one_hot).abs().sum(1).mean().item()
    assert math.exp(-1) - 1e-9 <= epsilon <= 1.0
    assert s - t - 1e-6 <= delta <= s + 1e-6
    assert gap == pytest.approx((F.softmax(student, 1) - F.softmax(teacher, 1)).abs().sum(1).mean().item(), rel=1e-5)


def test_switokd_values_by_hand() -> None:
    # Uniform student over 10 classes; teacher (0.7, 0.3, 0, ...); label 0:
    # s = 2·0.9 = 1.8, t = 0.3 + 0.3 = 0.6, G = 0.6 + 0.2 + 8·0.1 = 1.6.
    student = torch.zeros(1, 10)
    teacher = torch.full((1, 10), -1e4)
    teacher[0, :2] = torch.tensor([math.log(0.7), math.log(0.3)])
    gap, delta, epsilon = gap_threshold(student, teacher, torch.tensor([0]))
    assert gap == pytest.approx(1.6, rel=1e-5)
    assert epsilon == pytest.approx(math.exp(-0.6 / 2.4), rel=1e-5)
    assert delta == pytest.approx(1.8 - math.exp(-0.25) * 0.6, rel=1e-5)
    _, paper_epsilon = threshold(1.8, 0.6, "paper")
    assert paper_epsilon == pytest.approx(math.exp(-0.6 / 1.8))


@pytest.mark.parametrize("squared", [False, True])
def test_switokd_kl_has_no_temperature_squared_unless_asked(squared: bool) -> None:
    x, y = batch()
    method = build("switokd", temperature=2.0, temperature_squared=squared)
    step = method.step(x, y, 1)
    with torch.no_grad():
        teacher_logits, student_logits = method.teacher(x), method.student(x)
    p_t, p_s = F.softmax(teacher_logits / 2, 1), F.softmax(student_logits / 2, 1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean().item()  # KL(sg(p_t^T) ‖ p_s^T), written out
    student_loss = total_loss(step, "student").item()
    ce = F.cross_entropy(student_logits, y).item()
    assert student_loss == pytest.approx(ce + (4.0 if squared else 1.0) * kl, rel=1e-5)
    assert kl > 1e-4  # the two readings differ on this batch
    if "teacher" in step.losses:
        reverse = (p_s * (p_s.log() - p_t.log())).sum(1).mean().item()
        assert step.losses["teacher"]["kd"].item() == pytest.approx((4.0 if squared else 1.0) * reverse, rel=1e-5)


def other_rank(samples: int, s: float, t: float, gap: float) -> Any:
    """An ``all_reduce_mean`` that averages this rank's tensor with that of a simulated second rank
    holding ``samples`` samples of per-sample distances ``s``, ``t`` and ``gap``."""
    calls: list[Tensor] = []

    def reduce(tensor: Tensor) -> Tensor:
        calls.append(tensor.clone())
        return (tensor + torch.tensor([samples * s, samples * t, samples * gap, float(samples)])) / 2

    reduce.calls = calls  # type: ignore[attr-defined]
    return reduce


def test_switokd_distances_are_global_batch_means(monkeypatch: pytest.MonkeyPatch) -> None:
    student = torch.zeros(4, 10)  # uniform: s = 1.8 on each sample
    teacher = torch.full((4, 10), -1e4)
    teacher[:, :2] = torch.tensor([math.log(0.7), math.log(0.3)])  # t = 0.6, G = 1.6 against label 0
    reduce = other_rank(12, 1.8, 1.8, 0.0)  # 12 samples where both networks are uniform
    monkeypatch.setattr(switokd, "all_reduce_mean", reduce)
    s, t, gap = switokd.distances(student, teacher, torch.zeros(4, dtype=torch.long))
    assert len(reduce.calls) == 1 and reduce.calls[0][3].item() == 4  # sums and the sample count travel together
    # Weighted by each rank's sample count, not the mean of the two ranks' means:
    assert (s, t, gap) == pytest.approx(((4 * 1.8 + 12 * 1.8) / 16, (4 * 0.6 + 12 * 1.8) / 16, 4 * 1.6 / 16), rel=1e-5)


def test_switokd_distances_are_unchanged_without_distributed() -> None:
    student, teacher = random_logits(20).float(), random_logits(21).float()
    target = torch.tensor([0, 1, 2, 3, 4, 5])
    one_hot = F.one_hot(target, 7).float()
    p_s, p_t = F.softmax(student, 1), F.softmax(teacher, 1)
    expected = ((p_s - one_hot).abs().sum(1).mean(), (p_t - one_hot).abs().sum(1).mean(),
                (p_s - p_t).abs().sum(1).mean())
    assert switokd.distances(student, teacher, target) == pytest.approx([v.item() for v in expected], rel=1e-6)


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
    assert float(step.signals["expert_fraction"]) == float(expert)
    assert bool(step.signals["gap"] > step.signals["threshold"]) == (teacher_probs != student_probs)
    # Decided on the device: both losses exist, and in expert mode the teacher's update is gated off.
    assert step.update is None and set(step.losses) == {"teacher", "student"} and set(step.gates) == {"teacher"}
    assert bool(step.gates["teacher"]) == (not expert)


def test_switokd_mode_follows_the_global_batch_not_this_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every DDP rank must take the same mode. Alone, this rank's batch says expert (G = 1.6 > δ = 1.33);
    with a second rank of 48 samples on which both networks are uniform, the global batch of 64 has
    s = 1.8, t = (16·0.6 + 48·1.8)/64 = 1.5, G = 16·1.6/64 = 0.4 < δ = 1.8 − exp(−1.5/3.3)·1.5 ≈ 0.85:
    learning mode."""
    x = batch()[0]
    y = torch.zeros(BATCH, dtype=torch.long)
    assert switokd_with(TEACHER_RIGHT, UNIFORM).step(x, y, 1).signals["expert_fraction"] == 1.0
    monkeypatch.setattr(switokd, "all_reduce_mean", other_rank(3 * BATCH, 1.8, 1.8, 0.0))
    step = switokd_with(TEACHER_RIGHT, UNIFORM).step(x, y, 1)
    assert step.signals["expert_fraction"] == 0.0 and set(step.losses) == {"teacher", "student"}
    assert step.signals["gap"] == pytest.approx(0.4, rel=1e-4)
    assert step.signals["threshold"] == pytest.approx(1.8 - math.exp(-1.5 / 3.3) * 1.5, rel=1e-4)


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
    rates = LearningRates.for_recipe(config.recipe, list(optimizers), 1)
    train_epoch(method, optimizers, OneBatch(batch()[0], torch.zeros(BATCH, dtype=torch.long)), 1, rates, runtime)
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
    # No momentum: its buffers are zeros, which SGD (no dampening) treats exactly as none.
    assert all(not state["momentum_buffer"].any() for state in optimizers["teacher"].state.values())
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
    ("kdcl", ("teacher", "student")), ("sokd", ("aux", "student")),
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


def test_correlation_distance_cases_by_hand() -> None:
    a = torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0], [0.5, -1.0, 2.0], [1.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0], [-0.5, 1.0, -2.0], [1.0, 1.0, 0.0]])
    assert correlation_distance(a[:1], b[:1]).item() == pytest.approx(0.0, abs=1e-6)  # identical
    assert correlation_distance(a[1:2], b[1:2]).item() == pytest.approx(1.0)  # orthogonal
    assert correlation_distance(a[2:3], b[2:3]).item() == pytest.approx(0.0, abs=1e-6)  # negated: |cos| = 1
    assert correlation_distance(a[3:], b[3:]).item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)
    assert correlation_distance(a, b).item() == pytest.approx((0 + 1 + 0 + 1 - 1 / math.sqrt(2)) / 4, rel=1e-6)


def test_correlation_value_loss_uses_rows_and_columns() -> None:
    student, teacher = random_logits(12), random_logits(13)
    p_s, p_t = F.softmax(student / 4, 1), F.softmax(teacher / 4, 1)
    rows = 1 - ((p_s * p_t).sum(1) / (p_s.norm(dim=1) * p_t.norm(dim=1) + 1e-8)).mean()
    columns = 1 - ((p_s * p_t).sum(0) / (p_s.norm(dim=0) * p_t.norm(dim=0) + 1e-8)).mean()
    torch.testing.assert_close(correlation_value_loss(student, teacher, 4.0), 16 * (rows + columns))
    assert correlation_value_loss(teacher, teacher, 4.0).item() == pytest.approx(0.0, abs=1e-5)


def test_ranks_and_spearman() -> None:
    values = torch.tensor([[0.1, 0.5, 0.3, -2.0]])
    assert hard_ranks(values).tolist() == [[2.0, 4.0, 3.0, 1.0]]
    torch.testing.assert_close(soft_ranks(values, 1e-3), hard_ranks(values))
    ranks = hard_ranks(values)
    assert spearman_correlation(ranks, ranks).item() == pytest.approx(1.0)
    assert spearman_correlation(ranks, 5 - ranks).item() == pytest.approx(-1.0)
    # ranks (1, 2, 3) vs (1, 3, 2): ρ = 1 − 6·Σd²/(n(n² − 1)) = 1 − 6·2/24 = 0.5
    in_order, swapped = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 3.0, 2.0]])
    assert spearman_correlation(in_order, swapped).item() == pytest.approx(0.5)


def test_rank_loss_has_a_gradient_only_when_soft() -> None:
    student, teacher = random_logits(14).requires_grad_(), random_logits(15)
    assert not rank_loss(student, teacher, 4.0).requires_grad
    soft = rank_loss(student, teacher, 4.0, soft_rank_scale=0.1)
    soft.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert rank_loss(teacher, teacher, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert rank_loss(-teacher, teacher, 4.0).item() == pytest.approx(2.0, abs=1e-6)


def test_r2kd_value_and_rank_targets_are_detached() -> None:
    student, teacher = random_logits(16).requires_grad_(), random_logits(17).requires_grad_()
    (correlation_value_loss(student, teacher, 4.0) + rank_loss(student, teacher, 4.0, soft_rank_scale=0.1)
     + correlation_distance(student, teacher)).backward()
    assert teacher.grad is None and student.grad is not None and student.grad.abs().sum() > 0


def test_rank_loss_ranks_the_softened_probabilities_as_the_code_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """The code ranks softmax(z/τ), not z. Within a row both give the same order, so the check is on
    what the ranking is fed. The logits are chosen so that the two inputs differ in a way that would
    show: the ranks down each column (across the batch) differ between z and softmax(z/τ)."""
    # Class 1: a larger logit in row 0 (4 > 3), a larger probability in row 1 (0.36 < 0.69 at τ = 2).
    student = torch.tensor([[5.0, 4.0, 0.0], [0.0, 3.0, 0.0]])
    teacher = torch.tensor([[6.0, 5.0, 0.0], [0.0, 4.0, 1.0]])
    temperature = 2.0
    fed: list[Tensor] = []

    def recording_ranks(values: Tensor) -> Tensor:
        fed.append(values.clone())
        return hard_ranks(values)

    monkeypatch.setattr(r2kd, "hard_ranks", recording_ranks)
    r2kd.rank_loss(student, teacher, temperature)
    expected = [F.softmax(teacher / temperature, 1), F.softmax(student / temperature, 1)]
    assert len(fed) == 2
    for values, softened in zip(fed, expected, strict=True):
        torch.testing.assert_close(values, softened)
    column_ranks = lambda values: hard_ranks(values.T).T  # noqa: E731  rank of each sample within its class
    assert not torch.equal(column_ranks(student), column_ranks(F.softmax(student / temperature, 1)))
    assert not torch.equal(column_ranks(teacher), column_ranks(F.softmax(teacher / temperature, 1)))
    assert torch.equal(hard_ranks(student), hard_ranks(F.softmax(student / temperature, 1)))  # rows agree


def test_r2kd_rank_term_uses_the_softened_ensemble(monkeypatch: pytest.MonkeyPatch) -> None:
    method = build("r2kd", augmentation="none", temperature=3.0)
    x, y = batch()
    fed: list[Tensor] = []
    real_rank_loss = r2kd.rank_loss

    def recording(student: Tensor, teacher: Tensor, temperature: float, scale: float | None = None) -> Tensor:
        fed.append(teacher)
        assert temperature == 3.0
        return real_rank_loss(student, teacher, temperature, scale)

    monkeypatch.setattr(r2kd, "rank_loss", recording)
    step = method.step(x, y, 1)
    with torch.no_grad():
        ensemble = 0.7 * method.teacher(x) + 0.3 * method.pruned_teacher(x)
        expected = 2.0 * real_rank_loss(method.student(x), ensemble, 3.0)
    torch.testing.assert_close(fed[0], ensemble)
    assert step.losses["student"]["rank"].item() == pytest.approx(expected.item(), rel=1e-6)


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
    ("kdcl", {}, False, {"ensemble_ce"}),
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
