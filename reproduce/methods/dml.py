"""DML, Zhang et al. 2018 [standard]: networks trained from scratch, each learning from the others.

``L_k = CE(z_k, y) + 1/(K−1)·Σ_{l≠k} KL(sg(p_l) ‖ p_k)`` with τ = 1 and no τ² factor (τ² = 1). Each
network runs one forward per step (O(K), not O(K²)); the peers' predictions are detached inside
``kd_loss``, so one backward of the summed losses updates every network simultaneously.
The roles are the pair of params.yaml ``models`` (``teacher`` is simply the larger peer), plus
``extra_students`` more copies of the student architecture for K > 2.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from reproduce.losses import cross_entropy, kd_loss
from reproduce.methods.base import PeerGroupMethod, Step, register


@register
class DML(PeerGroupMethod):
    name = "dml"
    display_name = "DML"
    row_order = 20
    search_space = {
        "temperature": {"type": "float", "low": 1, "high": 4},
        "kd_weight": {"type": "float", "low": 0.25, "high": 4, "log": True},
    }

    @dataclass
    class Params:
        temperature: float = 1.0
        kd_weight: float = 1.0
        extra_students: int = 0  # K = 2 + extra_students peers

    def step(self, x: Tensor, y: Tensor, epoch: int | Tensor) -> Step:
        logits = {role: network(x) for role, network in self.peers.items()}
        p = self.params
        losses = {}
        for role, own in logits.items():
            mimicry = sum(kd_loss(own, other, p.temperature) for peer, other in logits.items() if peer != role)
            losses[role] = {"ce": cross_entropy(own, y), "kd": p.kd_weight * mimicry / (len(logits) - 1)}
        return Step(losses=losses)
