"""SwitOKD, Switchable Online KD (Qian et al., ECCV 2022) [code: hfutqian/SwitOKD; paper figures].

Teacher and student train from scratch together. Every mini-batch measures, detached and at τ = 1,
the L1 distances ``s = mean‖p_s − e_y‖₁``, ``t = mean‖p_t − e_y‖₁`` and the gap ``G = mean‖p_s − p_t‖₁``,
with ``ε = exp(−t/(t + s))`` [code] and the adaptive threshold ``δ = s − ε·t``.

- Expert mode, when ``G > δ`` and ``t < s`` [code; the paper states only G > δ]: the teacher pauses:
  no loss, no backward, no optimiser step (so no momentum and no weight decay either); it stays in
  train() mode, so its BatchNorm statistics still follow its forward. The student trains on
  ``CE(z_s, y) + τ²·KL(sg(p_t^τ)‖p_s^τ)``.
- Learning mode otherwise: both train DML-style, ``L_T = CE + τ²·KL(sg(p_s^τ)‖p_t^τ)`` and
  ``L_S = CE + τ²·KL(sg(p_t^τ)‖p_s^τ)``, updated simultaneously.

Options: eps_form code (``exp(−t/(t+s))``) | paper (Fig. 1's ``exp(−t/s)``);
expert_requires_teacher_better true (the code's ``t < s``; false = the paper's G > δ alone);
temperature 1 (the code's; τ² = 1 there; a third-party summary reports τ = 2 preferred in the ablation).
Signals: ``expert_fraction`` (the engine's epoch mean of 1.0/0.0 per step: the method's signature
plot), ``gap`` G, ``threshold`` δ, ``epsilon`` ε. The multi-network variants (2T1S, 1T2S) are out of scope.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from reproduce.losses import SWITOKD_EPSILON_FORMS, cross_entropy, kd_loss, switokd_distances, switokd_threshold
from reproduce.methods.base import OnlinePairMethod, Step, check_choice, register


@register
class SwitOKD(OnlinePairMethod):
    name = "switokd"

    @dataclass
    class Params:
        temperature: float = 1.0
        eps_form: str = "code"  # code: exp(−t/(t+s)) | paper: exp(−t/s)
        expert_requires_teacher_better: bool = True  # the code's extra `t < s` condition

        def validate(self) -> None:
            check_choice(self.eps_form, SWITOKD_EPSILON_FORMS, "methods.switokd.eps_form")

    def step(self, x: Tensor, y: Tensor, epoch: int) -> Step:
        p = self.params
        teacher_logits = self.teacher(x)
        student_logits = self.student(x)
        student_distance, teacher_distance, gap = switokd_distances(student_logits, teacher_logits, y)
        threshold, epsilon = switokd_threshold(student_distance, teacher_distance, p.eps_form)
        teacher_is_better = teacher_distance < student_distance or not p.expert_requires_teacher_better
        expert = gap > threshold and teacher_is_better

        student_losses = {"ce": cross_entropy(student_logits, y),
                          "kd": kd_loss(student_logits, teacher_logits, p.temperature)}
        signals = {"expert_fraction": float(expert), "gap": gap, "threshold": threshold, "epsilon": epsilon}
        if expert:
            return Step(losses={"student": student_losses}, update=frozenset({"student"}), signals=signals)
        teacher_losses = {"ce": cross_entropy(teacher_logits, y),
                          "kd": kd_loss(teacher_logits, student_logits, p.temperature)}
        return Step(losses={"teacher": teacher_losses, "student": student_losses}, signals=signals)
