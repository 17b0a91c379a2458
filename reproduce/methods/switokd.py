"""SwitOKD, Switchable Online KD (Qian et al., ECCV 2022) [code: hfutqian/SwitOKD; paper figures].

Teacher and student train from scratch together. Every mini-batch measures, detached and at τ = 1,
the L1 distances ``s = mean‖p_s − e_y‖₁``, ``t = mean‖p_t − e_y‖₁`` and the gap ``G = mean‖p_s − p_t‖₁``,
with ``ε = exp(−t/(t + s))`` [code] and the adaptive threshold ``δ = s − ε·t``.

- Expert mode, when ``G > δ`` and ``t < s`` [code; the paper states only G > δ]: the teacher pauses:
  no update, no momentum and no weight decay (its loss is not applied: ``Step.gates`` keeps its
  parameters and momentum as they were, decided on the device, and its loss is left out of the epoch's
  means); it stays in train() mode, so its BatchNorm statistics still follow its forward. The student
  trains on ``CE(z_s, y) + KL(sg(p_t^τ)‖p_s^τ)``.
- Learning mode otherwise: both train DML-style, ``L_T = CE + KL(sg(p_s^τ)‖p_t^τ)`` and
  ``L_S = CE + KL(sg(p_t^τ)‖p_s^τ)``, updated simultaneously.
- The KL at temperature τ is not multiplied by τ² [code: its KL term never rescales];
  ``temperature_squared: true`` adds Hinton's τ² (which only matters when τ ≠ 1).
- Under DDP the mode must be the same on every rank (a teacher paused on one rank and stepped on
  another would desynchronise its replicas), so s, t and G are means over the global batch:
  each rank's sums and sample count are averaged across ranks before the division.

Options: eps_form code (``exp(−t/(t+s))``) | paper (Fig. 1's ``exp(−t/s)``);
expert_requires_teacher_better true (the code's ``t < s``; false = the paper's G > δ alone);
temperature 1 (the code's; a third-party summary reports τ = 2 preferred in the paper's ablation);
temperature_squared false (the code's).
Signals: ``expert_fraction`` (the engine's epoch mean of 1.0/0.0 per step: the method's signature
plot), ``gap`` G, ``threshold`` δ, ``epsilon`` ε. The multi-network variants (2T1S, 1T2S) are out of scope.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from reproduce.distributed import all_reduce_mean
from reproduce.losses import cross_entropy, forward_kl_per_sample, one_hot
from reproduce.methods.base import OnlinePairMethod, Step, check_choice, register

EPSILON_FORMS = ("code", "paper")


def distances(student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
    """``[s, t, G]`` (float64, on the device): ``s = mean‖p_s − e_y‖₁``, ``t = mean‖p_t − e_y‖₁``,
    ``G = mean‖p_s − p_t‖₁``, the means taken over the global batch (every DDP rank's samples), so that every
    rank switches alike."""
    with torch.no_grad():
        student_probs, teacher_probs = F.softmax(student.float(), dim=1), F.softmax(teacher.float(), dim=1)
        indicator = one_hot(target, student.shape[1])
        sums = torch.stack([(student_probs - indicator).abs().sum(1).sum(),
                            (teacher_probs - indicator).abs().sum(1).sum(),
                            (student_probs - teacher_probs).abs().sum(1).sum(),
                            student_probs.new_full((), float(len(target)))])
        # Sums and counts, not per-rank means: a smaller last batch on one rank still weighs by its size.
        sums = all_reduce_mean(sums).double()  # the divisions in float64, as the code's Python floats
    return sums[:3] / sums[3]


def threshold(student_distance: Tensor | float, teacher_distance: Tensor | float,
              eps_form: str = "code") -> tuple[Tensor, Tensor]:
    """``(δ, ε)`` with ``δ = s − ε·t``; ``ε = exp(−t/(t + s))`` in the code, ``exp(−t/s)`` in the paper's Fig. 1."""
    s, t = torch.as_tensor(student_distance, dtype=torch.float64), torch.as_tensor(teacher_distance, dtype=torch.float64)
    denominator = {"code": t + s, "paper": s}[eps_form]
    epsilon = torch.exp(-t / denominator.clamp_min(1e-12))  # both distances are 0 only for exact one-hot outputs
    return s - epsilon * t, epsilon


def gap_threshold(student: Tensor, teacher: Tensor, target: Tensor,
                  eps_form: str = "code") -> tuple[Tensor, Tensor, Tensor]:
    """SwitOKD's gap ``G``, adaptive threshold ``δ`` and ``ε``, as 0-d tensors."""
    s, t, gap = distances(student, teacher, target)
    delta, epsilon = threshold(s, t, eps_form)
    return gap, delta, epsilon


@register
class SwitOKD(OnlinePairMethod):
    name = "switokd"
    display_name = "SwitOKD"
    row_order = 32
    search_space = {
        "temperature": {"type": "float", "low": 1, "high": 4},
        "eps_form": {"type": "categorical", "choices": ["code", "paper"]},
    }

    @dataclass
    class Params:
        temperature: float = 1.0
        eps_form: str = "code"  # code: exp(−t/(t+s)) | paper: exp(−t/s)
        expert_requires_teacher_better: bool = True  # the code's extra `t < s` condition
        temperature_squared: bool = False  # the code's KL has no τ² factor; true = Hinton's τ²·KL

        def validate(self) -> None:
            check_choice(self.eps_form, EPSILON_FORMS, "methods.switokd.eps_form")

    def mimicry(self, own: Tensor, peer: Tensor) -> Tensor:
        """``KL(sg(p_peer^τ) ‖ p_own^τ)``, times τ² only with ``temperature_squared``."""
        p = self.params
        scale = p.temperature**2 if p.temperature_squared else 1.0
        return scale * forward_kl_per_sample(own, peer, p.temperature).mean()

    def step(self, x: Tensor, y: Tensor, epoch: int | Tensor) -> Step:
        p = self.params
        teacher_logits = self.teacher(x)
        student_logits = self.student(x)
        student_distance, teacher_distance, gap = distances(student_logits, teacher_logits, y)
        delta, epsilon = threshold(student_distance, teacher_distance, p.eps_form)
        teacher_is_better = teacher_distance < student_distance
        if not p.expert_requires_teacher_better:
            teacher_is_better = torch.ones_like(teacher_is_better)
        expert = (gap > delta) & teacher_is_better  # decided on the device: the step never waits for it
        return Step(
            losses={"teacher": {"ce": cross_entropy(teacher_logits, y), "kd": self.mimicry(teacher_logits, student_logits)},
                    "student": {"ce": cross_entropy(student_logits, y), "kd": self.mimicry(student_logits, teacher_logits)}},
            gates={"teacher": ~expert},  # expert mode: the teacher's update is not applied
            signals={"expert_fraction": expert.double(), "gap": gap, "threshold": delta, "epsilon": epsilon},
        )
