"""DML (reproduce/methods/dml.py): every peer learns CE plus the mean KL to the others."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from method_kit import batch, build, declares
from reproduce.losses import kd_loss
from reproduce.methods import MethodKind

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_declarations() -> None:
    assert declares("dml", "DML", 20, bad=[{"extra_students": -1}]).kind is MethodKind.ONLINE


def test_each_peer_learns_from_the_mean_of_the_others() -> None:
    method = build("dml", extra_students=1, kd_weight=0.5, temperature=2.0)
    assert set(method.roles()) == {"teacher", "student", "student2"}
    x, y = batch()
    step = method.step(x, y, 1)
    with torch.no_grad():
        logits = {role: network(x) for role, network in method.peers.items()}
    for role, own in logits.items():
        others = [kd_loss(own, other, 2.0) for peer, other in logits.items() if peer != role]
        assert step.losses[role]["ce"].item() == pytest.approx(F.cross_entropy(own, y).item(), rel=1e-6)
        assert step.losses[role]["kd"].item() == pytest.approx(0.5 * sum(others).item() / 2, rel=1e-5)
