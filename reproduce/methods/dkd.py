"""DKD, Decoupled KD (Zhao et al., CVPR 2022) [standard; code: megvii-research/mdistiller].

KL(p_t‖p_s) splits into a target-class term TCKD (binary: target vs the rest) and a non-target term
NCKD (the distribution renormalised over the other classes), which DKD weights separately:
``L = ce_weight·CE(z_s, y) + min(epoch / warmup_epochs, 1)·τ²·(α·TCKD + β·NCKD)``.

Options (defaults: mdistiller's CIFAR-100 resnet32x4 → resnet8x4 config):
  temperature τ = 4; alpha α = 1; beta β = 8 (6 for vgg13→vgg8, vgg13→MobileNetV2, wrn_40_2→wrn_16_2,
  wrn_40_2→wrn_40_1; 2 for resnet56→resnet20, resnet110→resnet32; ImageNet τ = 1, β = 0.5 for R34→R18);
  warmup_epochs = 20 (linear ramp of the KD weight, epochs counted from 1); ce_weight = 1.
The teacher is pre-trained, frozen, in eval() mode, run under no_grad.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from reproduce.losses import cross_entropy, dkd_loss
from reproduce.methods.base import ConfigError, Step, TeacherStudentMethod, ramp, register


@register
class DKD(TeacherStudentMethod):
    name = "dkd"
    display_name = "DKD"
    row_order = 11
    search_space = {
        "temperature": {"type": "float", "low": 1, "high": 8},
        "alpha": {"type": "float", "low": 0.5, "high": 2},
        "beta": {"type": "float", "low": 0.5, "high": 10, "log": True},
    }

    @dataclass
    class Params:
        temperature: float = 4.0
        alpha: float = 1.0  # TCKD weight
        beta: float = 8.0  # NCKD weight
        warmup_epochs: int = 20
        ce_weight: float = 1.0

        def validate(self) -> None:
            if self.warmup_epochs < 1:
                raise ConfigError("methods.dkd.warmup_epochs: must be >= 1 (1 = no ramp)")

    def step(self, x: Tensor, y: Tensor, epoch: int | Tensor) -> Step:
        p = self.params
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        student_logits = self.student(x)
        warmup = ramp(epoch, p.warmup_epochs)
        return Step(losses={"student": {
            "ce": p.ce_weight * cross_entropy(student_logits, y),
            "dkd": warmup * dkd_loss(student_logits, teacher_logits, y, p.alpha, p.beta, p.temperature),
        }})
