"""KD, Hinton et al. 2015 [standard]: the student matches the frozen teacher's softened outputs.

``L_S = α_ce·CE(z_s, y) + α_kd·τ²·KL(sg(p_t^τ) ‖ p_s^τ)``; CIFAR defaults τ = 4, α_ce = 0.1, α_kd = 0.9
(the CRD/RepDistiller recipe). The teacher is pre-trained, frozen, in eval() mode, run under no_grad.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from reproduce.losses import cross_entropy, kd_loss
from reproduce.methods.base import Step, TeacherStudentMethod, register


@register
class KD(TeacherStudentMethod):
    name = "kd"
    display_name = "KD"
    row_order = 10
    search_space = {
        "temperature": {"type": "float", "low": 1, "high": 8},
        "ce_weight": {"type": "float", "low": 0.0, "high": 1.0},
        "kd_weight": {"type": "float", "low": 0.1, "high": 1.0},
    }

    @dataclass
    class Params:
        temperature: float = 4.0
        ce_weight: float = 0.1
        kd_weight: float = 0.9

    def step(self, x: Tensor, y: Tensor, epoch: int | Tensor) -> Step:
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        student_logits = self.student(x)
        p = self.params
        return Step(losses={"student": {
            "ce": p.ce_weight * cross_entropy(student_logits, y),
            "kd": p.kd_weight * kd_loss(student_logits, teacher_logits, p.temperature),
        }})
