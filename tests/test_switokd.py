"""SwitOKD (reproduce/methods/switokd.py): its distances, threshold and mode, decided on the device, and the
paused teacher, against the official code's host decision."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import reproduce.methods.switokd as switokd
from method_kit import (BATCH, CPU, FixedBatches, batch, build, constant_output, declares, optimizers_for,
                        random_logits, run_epoch, total_loss, trains_and_learns)
from reproduce.losses import cross_entropy
from reproduce.methods import Method
from reproduce.methods.switokd import gap_threshold, threshold

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def host_decided_step(method: Method, optimizers: dict[str, torch.optim.Optimizer], x: torch.Tensor,
                      y: torch.Tensor) -> bool:
    """One step as the official code takes it: the mode read on the host as Python floats, and in expert
    mode no teacher loss, no teacher backward and no teacher optimiser step. Returns whether it was expert."""
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    teacher_logits, student_logits = method.teacher(x), method.student(x)
    s, t, gap = (float(value) for value in switokd.distances(student_logits, teacher_logits, y))
    delta = s - math.exp(-t / max(t + s, 1e-12)) * t
    expert = gap > delta and t < s
    loss = cross_entropy(student_logits, y) + method.mimicry(student_logits, teacher_logits)
    if not expert:
        loss = loss + cross_entropy(teacher_logits, y) + method.mimicry(teacher_logits, student_logits)
    loss.backward()
    optimizers["student"].step()
    if not expert:
        optimizers["teacher"].step()
    return expert


def momentum(optimizer: torch.optim.Optimizer, parameter: nn.Parameter) -> torch.Tensor:
    """The parameter's momentum buffer; no buffer yet counts as zeros (SGD without dampening: the same)."""
    buffer = optimizer.state.get(parameter, {}).get("momentum_buffer")
    return torch.zeros_like(parameter) if buffer is None else buffer


@pytest.mark.parametrize("gates_on_host", [False, True], ids=["gated-on-device", "read-on-host"])
def test_the_engine_trains_exactly_as_the_official_host_decision(gates_on_host: bool) -> None:
    """The engine decides SwitOKD's mode on the device and gates the teacher's update (as on a GPU), or, on a
    CPU, reads the gate and leaves the paused teacher out of the backward; the official code decides on the
    host and skips the teacher. Step after step, on the same batches, each leaves the same parameters,
    BatchNorm statistics and momentum, bit for bit, through both modes."""
    official = build("switokd")
    engine = copy.deepcopy(official)
    official_optimizers, engine_optimizers = optimizers_for(official, lr=0.5), optimizers_for(engine, lr=0.5)
    runtime = dataclasses.replace(CPU, gates_on_host=gates_on_host)
    backward_roles: list[set[str]] = []  # the roles whose gradients the engine's backward computed
    modes = []
    for k in range(12):
        x, y = batch(k)
        modes.append(host_decided_step(official, official_optimizers, x, y))
        run_epoch(engine, engine_optimizers, FixedBatches((x, y)), runtime=runtime)
        backward_roles.append({role for role, network in engine.roles().items()
                               if any(p.grad is not None for p in network.parameters())})
        for (name, expected), actual in zip(official.state_dict().items(), engine.state_dict().values()):
            assert torch.equal(expected, actual), f"step {k + 1} ({'expert' if modes[-1] else 'learning'}): {name}"
        for role in ("teacher", "student"):
            for expected, actual in zip(official.roles()[role].parameters(), engine.roles()[role].parameters()):
                assert torch.equal(momentum(official_optimizers[role], expected),
                                   momentum(engine_optimizers[role], actual)), f"step {k + 1}: {role} momentum"
    assert any(modes) and not all(modes), f"both modes must occur: {modes}"
    # Read on the host, an expert step computes no teacher gradient; gated on the device, every step does.
    assert backward_roles == [{"student"} if expert and gates_on_host else {"teacher", "student"} for expert in modes]


def test_declarations_and_bad_options() -> None:
    declares("switokd", "SwitOKD", 32, bad=[{"eps_form": "figure"}, {"temperature_squared": "yes"}])


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


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def changed(before: dict[str, Tensor], module: nn.Module, kind: str) -> bool:
    """Whether any parameter (kind "param") or BN running statistic (kind "running") moved."""
    after = module.state_dict()
    names = [n for n in before if ("running" in n) == (kind == "running") and "num_batches" not in n]
    return any(not torch.equal(before[n], after[n]) for n in names)


def engine_step(method: Method) -> dict[str, torch.optim.Optimizer]:
    """One step through the engine's own epoch (zero_grad, step, backward, gated optimiser steps), label 0."""
    optimizers = optimizers_for(method)
    run_epoch(method, optimizers, FixedBatches((batch()[0], torch.zeros(BATCH, dtype=torch.long))))
    return optimizers


def test_switokd_expert_mode_leaves_the_teacher_untouched_but_its_bn_statistics() -> None:
    method = switokd_with(TEACHER_RIGHT, UNIFORM)
    teacher_before, student_before = snapshot(method.teacher), snapshot(method.student)
    optimizers = engine_step(method)
    assert not changed(teacher_before, method.teacher, "param")  # no gradient step, no weight decay
    # No momentum: its buffers are zeros, which SGD (no dampening) treats exactly as none.
    assert all(not state["momentum_buffer"].any() for state in optimizers["teacher"].state.values())
    assert changed(teacher_before, method.teacher, "running")  # train() mode: BN still tracks the batches
    assert changed(student_before, method.student, "param")
    assert all(torch.is_tensor(state["momentum_buffer"]) for state in optimizers["student"].state.values())


def test_switokd_learning_mode_updates_both() -> None:
    method = switokd_with(TEACHER_RIGHT, TEACHER_RIGHT)
    teacher_before = snapshot(method.teacher)
    optimizers = engine_step(method)
    assert changed(teacher_before, method.teacher, "param") and optimizers["teacher"].state


@pytest.mark.slow
def test_training_lowers_the_loss_and_the_student_learns(prepared_root: Path, tmp_path: Path) -> None:
    summary = trains_and_learns("switokd", {}, prepared_root, tmp_path)
    assert set(summary["signals"]) == {"expert_fraction", "gap", "epsilon", "threshold"}
