"""SwitOKD: its distances, threshold and mode, and the paused teacher."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import reproduce.methods.switokd as switokd
from method_kit import FixedBatches, batch, build, optimizers_for, run_epoch
from reproduce.losses import cross_entropy
from reproduce.methods import Method

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


def test_the_device_decision_trains_exactly_as_the_official_host_decision() -> None:
    """The engine decides SwitOKD's mode on the device and gates the teacher's update; the official code
    decides on the host and skips the teacher. Step after step, on the same batches, both leave the same
    parameters, BatchNorm statistics and momentum, bit for bit, through both modes."""
    official = build("switokd")
    engine = copy.deepcopy(official)
    official_optimizers, engine_optimizers = optimizers_for(official, lr=0.5), optimizers_for(engine, lr=0.5)
    modes = []
    for k in range(12):
        x, y = batch(k)
        modes.append(host_decided_step(official, official_optimizers, x, y))
        run_epoch(engine, engine_optimizers, FixedBatches((x, y)))
        for (name, expected), actual in zip(official.state_dict().items(), engine.state_dict().values()):
            assert torch.equal(expected, actual), f"step {k + 1} ({'expert' if modes[-1] else 'learning'}): {name}"
        for role in ("teacher", "student"):
            for expected, actual in zip(official.roles()[role].parameters(), engine.roles()[role].parameters()):
                assert torch.equal(momentum(official_optimizers[role], expected),
                                   momentum(engine_optimizers[role], actual)), f"step {k + 1}: {role} momentum"
    assert any(modes) and not all(modes), f"both modes must occur: {modes}"
