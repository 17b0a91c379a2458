"""BD-KD, Balancing the Divergences for online KD (Amara et al., arXiv 2212.12965 v2).

Provenance. [paper, abstract] online logit KD (teacher and student from scratch) whose loss is
adjusted on both sides with a sample-wise weighting of forward and reverse KL, to balance the
student's confidence and improve accuracy and calibration. No official code exists and the method
text was not available: everything below is [reconstructed] from the abstract and a third-party
summary (weights guided by the teacher/student entropy gap; reverse KL as the teacher's
regulariser), and every choice is an option.

- Student: ``L_S = CE(z_s, y) + λ_s·τ²·mean_i[w_i·FKL_i + (1 − w_i)·RKL_i]`` with
  ``FKL = KL(sg(p_t)‖p_s)``, ``RKL = KL(p_s‖sg(p_t))``.
- Weight ``w_i`` (detached), from the entropies ``H_s, H_t`` at the same τ:
  weighting entropy_ratio ``w = H_t/(H_t + H_s)`` | hard ``w = 1[H_s < H_t]`` | sigmoid
  ``w = σ(κ·(H_t − H_s))``. The direction: a student more confident than its teacher (H_s < H_t,
  over-confident, bad for ECE) gets more of the mass-covering FKL, a less confident one more of the
  mode-seeking RKL. ``flip: true`` swaps w and 1 − w.
- Teacher: ``L_T = CE(z_t, y) + λ_t·τ²·R_T``; teacher_reg dml ``R_T = KL(sg(p_s)‖p_t)`` | reverse
  ``R_T = KL(p_t‖sg(p_s))``.

Options: temperature 1; student_kd_weight λ_s 1; teacher_kd_weight λ_t 1; weighting entropy_ratio;
kappa 1 (sigmoid only); flip false; teacher_reg dml. Signals: ``forward_weight`` (mean w),
``student_entropy`` (mean H_s), ``teacher_entropy`` (mean H_t).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from reproduce.losses import balanced_kd_loss, cross_entropy, entropy, kd_loss, reverse_kd_loss
from reproduce.methods.base import OnlinePairMethod, Step, check_choice, mean_of, register

# w(H_s, H_t, κ): the weight of the forward KL for each sample.
FORWARD_WEIGHTINGS: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "entropy_ratio": lambda h_s, h_t, kappa: h_t / (h_t + h_s).clamp_min(1e-12),
    "hard": lambda h_s, h_t, kappa: (h_s < h_t).float(),
    "sigmoid": lambda h_s, h_t, kappa: torch.sigmoid(kappa * (h_t - h_s)),
}

# R_T(z_t, z_s, τ) with τ² included; the student's output is detached inside the loss.
TEACHER_REGULARISERS: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "dml": kd_loss,  # τ²·KL(sg(p_s) ‖ p_t)
    "reverse": reverse_kd_loss,  # τ²·KL(p_t ‖ sg(p_s))
}


@register
class BDKD(OnlinePairMethod):
    name = "bdkd"
    display_name = "BD-KD"
    row_order = 30
    search_space = {
        "temperature": {"type": "float", "low": 1, "high": 4},
        "student_kd_weight": {"type": "float", "low": 0.25, "high": 4, "log": True},
        "teacher_kd_weight": {"type": "float", "low": 0.25, "high": 4, "log": True},
        "weighting": {"type": "categorical", "choices": ["entropy_ratio", "hard", "sigmoid"]},
        "teacher_reg": {"type": "categorical", "choices": ["dml", "reverse"]},
    }

    @dataclass
    class Params:
        temperature: float = 1.0
        student_kd_weight: float = 1.0  # λ_s
        teacher_kd_weight: float = 1.0  # λ_t
        weighting: str = "entropy_ratio"  # entropy_ratio | hard | sigmoid
        kappa: float = 1.0  # sigmoid weighting's slope, per nat of entropy gap
        flip: bool = False  # swap w and 1 − w
        teacher_reg: str = "dml"  # dml | reverse

        def validate(self) -> None:
            check_choice(self.weighting, tuple(FORWARD_WEIGHTINGS), "methods.bdkd.weighting")
            check_choice(self.teacher_reg, tuple(TEACHER_REGULARISERS), "methods.bdkd.teacher_reg")

    def step(self, x: Tensor, y: Tensor, epoch: int | Tensor) -> Step:
        p = self.params
        teacher_logits = self.teacher(x)
        student_logits = self.student(x)
        student_entropy = entropy(student_logits.detach().float(), p.temperature)
        teacher_entropy = entropy(teacher_logits.detach().float(), p.temperature)
        forward_weight = FORWARD_WEIGHTINGS[p.weighting](student_entropy, teacher_entropy, p.kappa)
        if p.flip:
            forward_weight = 1 - forward_weight
        regulariser = TEACHER_REGULARISERS[p.teacher_reg]
        return Step(
            losses={
                "student": {"ce": cross_entropy(student_logits, y),
                            "kd": p.student_kd_weight * balanced_kd_loss(student_logits, teacher_logits,
                                                                          forward_weight, p.temperature)},
                "teacher": {"ce": cross_entropy(teacher_logits, y),
                            "kd": p.teacher_kd_weight * regulariser(teacher_logits, student_logits, p.temperature)},
            },
            signals={"forward_weight": mean_of(forward_weight), "student_entropy": mean_of(student_entropy),
                     "teacher_entropy": mean_of(teacher_entropy)},
        )
