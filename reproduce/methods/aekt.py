"""AEKT, Adaptive Explicit Knowledge Transfer (Park & Lee, arXiv 2409.01679).

Provenance. [paper, abstract] offline logit KD built on DKD: besides the non-target distribution
("implicit knowledge"), the student learns the teacher's target-class confidence ("explicit
knowledge") adaptively, and classification is separated from distillation. No official code exists
and the method text was not available: everything below is [reconstructed] from the abstract and a
third-party summary, and every choice is an option.

- Heads: ``z_cls = fc_cls(f)`` (the student's own classifier) is trained with CE and is the only
  output used at inference; the distillation losses act on ``z_kd``, produced by the
  task-serialisation layer ``fc_ser`` (C×C, identity init, bias 0) from ``z_cls`` (head: serial), or
  by a separate ``fc_kd`` from the features ``f`` (head: parallel).
- ``r_i = sg(p_t^{y,τ} / p_s^{y,τ})`` on ``z_kd``, clipped to ``[0, max_ratio]``.
- ``L = ce_weight·CE(z_cls, y) + warm·τ²·(γ·mean_i[g(r_i)·TCKD_i] + β·mean_i NCKD_i)`` with
  ``warm = min(epoch / warmup_epochs, 1)`` and DKD's τ, β and warm-up. ``g(r) = r`` (explicit_weighting:
  ratio) or ``g = 1`` (explicit_weighting: one, which is exactly DKD with α = γ).

Options: head serial | parallel; explicit_weighting ratio | one; temperature 4; gamma 1; beta 8 (DKD's
per-pair table); max_ratio 10; warmup_epochs 20; ce_weight 1.
Signal: ``ratio``, the batch mean of the clipped r. At the end, fc_ser's weights are saved as a
heat-map (its off-diagonal entries are the inter-class relations the serial head learned).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from reproduce.io import atomic_savefig
from reproduce.losses import cross_entropy, dkd_parts, target_log_probability
from reproduce.methods.base import (ConfigError, Method, MethodKind, Networks, Step, check_choice, mean_of, ramp,
                                    register)


def identity_linear(num_classes: int) -> nn.Linear:
    layer = nn.Linear(num_classes, num_classes)
    nn.init.eye_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


@register
class AEKT(Method):
    name = "aekt"
    display_name = "AEKT"
    kind = MethodKind.OFFLINE
    row_order = 31
    search_space = {
        "temperature": {"type": "float", "low": 1, "high": 8},
        "gamma": {"type": "float", "low": 0.5, "high": 2},
        "beta": {"type": "float", "low": 0.5, "high": 10, "log": True},
        "head": {"type": "categorical", "choices": ["serial", "parallel"]},
        "explicit_weighting": {"type": "categorical", "choices": ["ratio", "one"]},
    }

    @dataclass
    class Params:
        head: str = "serial"  # serial: z_kd = fc_ser(z_cls) | parallel: z_kd = fc_kd(features)
        explicit_weighting: str = "ratio"  # g(r): ratio (g = r) | one (g = 1, DKD with α = γ)
        temperature: float = 4.0
        gamma: float = 1.0  # weight of the explicit (target-confidence, TCKD) term
        beta: float = 8.0  # weight of the implicit (non-target, NCKD) term
        max_ratio: float = 10.0
        warmup_epochs: int = 20
        ce_weight: float = 1.0

        def validate(self) -> None:
            check_choice(self.head, ("serial", "parallel"), "methods.aekt.head")
            check_choice(self.explicit_weighting, ("ratio", "one"), "methods.aekt.explicit_weighting")
            if self.warmup_epochs < 1:
                raise ConfigError("methods.aekt.warmup_epochs: must be >= 1 (1 = no ramp)")
            if self.max_ratio < 0:
                raise ConfigError("methods.aekt.max_ratio: must be >= 0")

    def __init__(self, networks: Networks, params: Params) -> None:
        super().__init__(networks, params)
        self.student = networks.student()
        self.teacher = networks.load_teacher()
        num_classes = networks.num_classes
        self.distill_head = (identity_linear(num_classes) if params.head == "serial"
                             else nn.Linear(self.student.classifier.in_features, num_classes))

    def roles(self) -> dict[str, nn.Module]:
        # One optimiser for the student and its distillation head: they learn together.
        return {"student": nn.ModuleDict({"network": self.student, "distill_head": self.distill_head})}

    def eval_networks(self) -> dict[str, nn.Module]:
        return {"student": self.student, "teacher": self.teacher}  # the student is z_cls only

    def frozen(self) -> list[nn.Module]:
        return [self.teacher]

    def step(self, x: Tensor, y: Tensor, epoch: int | Tensor) -> Step:
        p = self.params
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        features = self.student.features(x)
        class_logits = self.student.classifier(features)
        distill_logits = self.distill_head(class_logits if p.head == "serial" else features)

        tckd, nckd = dkd_parts(distill_logits, teacher_logits, y, p.temperature)
        with torch.no_grad():
            ratio = (target_log_probability(teacher_logits, y, p.temperature)
                     - target_log_probability(distill_logits, y, p.temperature)).exp().clamp(0.0, p.max_ratio)
        explicit_weight = ratio if p.explicit_weighting == "ratio" else torch.ones_like(ratio)
        kd_scale = ramp(epoch, p.warmup_epochs) * p.temperature**2  # warm-up ramp times τ²
        return Step(
            losses={"student": {
                "ce": p.ce_weight * cross_entropy(class_logits, y),
                "explicit": kd_scale * p.gamma * (explicit_weight * tckd).mean(),
                "implicit": kd_scale * p.beta * nckd.mean(),
            }},
            signals={"ratio": mean_of(ratio)},
        )

    def end_of_training(self, run_dir: Path) -> dict[str, Path]:
        if self.params.head != "serial":
            return {}
        from matplotlib.figure import Figure  # here: every training process imports the methods, ~1 s

        weight = self.distill_head.weight.detach().float().cpu()
        off_diagonal = weight - torch.diag(torch.diag(weight))
        # The diagonal stays near 1 and would wash out the colour scale; scale to the relations instead.
        limit = float(off_diagonal.abs().max()) or 1.0
        figure = Figure(figsize=(6, 5))
        axes = figure.subplots()
        image = axes.imshow(weight.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
        axes.set(title="AEKT fc_ser weight", xlabel="z_cls class", ylabel="z_kd class")
        figure.colorbar(image, ax=axes)
        path = run_dir / "aekt_fc_ser.png"
        atomic_savefig(figure, path, dpi=120, bbox_inches="tight")
        return {"aekt_fc_ser": path}
