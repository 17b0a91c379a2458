"""SOKD, Semi-Online KD (Liu et al., BMVC 2021, arXiv 2111.11747) [code: swlzq/Semi-Online-KD].

Three networks: T, the pre-trained teacher, frozen; A, an auxiliary branch grafted onto T, a copy of
T's head (its last stage, final norm, pooling and classifier) fed with T's trunk output, detached, so
only A learns; S, the student, from scratch. With τ = 4 and τ² [code]:

    L_A = CE(z_A, y) + τ²·KL(sg(p_T)‖p_A) + τ²·KL(sg(p_S)‖p_A)
    L_S = CE(z_S, y) + τ²·KL(sg(p_A)‖p_S)

The student learns from A only, never from T's head. One backward of L_A + L_S updates A and S
together (one optimiser per role here, same learning rate in the paper's recipe).

Options, each defaulting to the code's behaviour:
  aux_init random (A starts from a fresh random init, as the code's auxiliary branch does) | teacher
  (A starts as a copy of T's head); frozen_bn train (T stays in train() mode as in the code, so its
  BatchNorm statistics follow the training batches although its weights never change) | eval;
  temperature 4; aux_from_teacher_weight, aux_from_student_weight, student_from_aux_weight: 1.
Evaluated networks: "teacher" (T), "aux" (T's trunk + A: what SOKD reports as its teacher), "student".
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from reproduce.losses import cross_entropy, kd_loss
from reproduce.methods.base import Method, MethodKind, Networks, Step, check_choice, register
from reproduce.models import SplitNet


@register
class SOKD(Method):
    name = "sokd"
    display_name = "SOKD"
    kind = MethodKind.OFFLINE
    row_order = 33
    search_space = {
        "temperature": {"type": "float", "low": 1, "high": 8},
        "aux_from_teacher_weight": {"type": "float", "low": 0.25, "high": 4, "log": True},
        "aux_from_student_weight": {"type": "float", "low": 0.25, "high": 4, "log": True},
        "student_from_aux_weight": {"type": "float", "low": 0.25, "high": 4, "log": True},
    }

    @dataclass
    class Params:
        temperature: float = 4.0
        aux_init: str = "random"  # random | teacher
        frozen_bn: str = "train"  # train | eval: the mode of the frozen teacher while training
        aux_from_teacher_weight: float = 1.0
        aux_from_student_weight: float = 1.0
        student_from_aux_weight: float = 1.0

        def validate(self) -> None:
            check_choice(self.aux_init, ("random", "teacher"), "methods.sokd.aux_init")
            check_choice(self.frozen_bn, ("train", "eval"), "methods.sokd.frozen_bn")

    def __init__(self, networks: Networks, params: Params) -> None:
        super().__init__(networks, params)
        self.teacher = networks.load_teacher()
        branch = networks.fresh_teacher().head if params.aux_init == "random" else copy.deepcopy(self.teacher.head)
        # A shares T's trunk (frozen: its optimiser only sees A's parameters, the ones with gradients).
        self.aux = SplitNet(self.teacher.trunk, branch.requires_grad_(True))
        self.student = networks.student()

    def roles(self) -> dict[str, nn.Module]:
        return {"aux": self.aux, "student": self.student}

    def eval_networks(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher, "aux": self.aux, "student": self.student}

    def frozen(self) -> list[nn.Module]:
        return [self.teacher] if self.params.frozen_bn == "eval" else []

    def step(self, x: Tensor, y: Tensor, epoch: int | Tensor) -> Step:
        p = self.params
        with torch.no_grad():
            trunk_features = self.teacher.trunk(x)
            teacher_logits = self.teacher.head(trunk_features)
        aux_logits = self.aux.head(trunk_features)  # the features carry no graph: T's trunk never learns
        student_logits = self.student(x)
        return Step(losses={
            "aux": {"ce": cross_entropy(aux_logits, y),
                    "kd_teacher": p.aux_from_teacher_weight * kd_loss(aux_logits, teacher_logits, p.temperature),
                    "kd_student": p.aux_from_student_weight * kd_loss(aux_logits, student_logits, p.temperature)},
            "student": {"ce": cross_entropy(student_logits, y),
                        "kd": p.student_from_aux_weight * kd_loss(student_logits, aux_logits, p.temperature)},
        })
