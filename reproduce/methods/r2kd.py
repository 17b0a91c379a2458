"""R2KD, Robustness-Reinforced KD (Kim et al., IEEE TKDE 2024, arXiv 2311.13934) [code: Seonghak35/R2KD].

Offline. The target is an ensemble of the trained teacher T and a pruned copy of it:
``z̃ = w·z_T + (1 − w)·z_pruned`` with w = 0.7, where the pruned teacher is T with 10% of every
Conv2d/Linear weight tensor (classifier included; biases and BatchNorm untouched) zeroed by
layer-wise L1 unstructured magnitude pruning, once, with no fine-tuning [code]. With
``p_s = softmax(z_s/τ)`` and ``q = softmax(z̃/τ)``:

- ``L_val = κ_v·τ²·[mean_i d(p_s[i], q[i]) + mean_c d(p_s[:, c], q[:, c])]``, the uncentred
  correlation distance ``d(a, b) = 1 − |⟨a,b⟩|/(‖a‖‖b‖ + 1e-8)`` over rows and over columns [code];
- ``L_rank = κ_r·(1 − mean_i ρ_i)``, Spearman's ρ between the class rankings [code].
  The code ranks by argsort, so this term has no gradient: it is logged, not learned
  (rank_gradient none). rank_gradient soft ranks the student softly instead (σ of pairwise
  log-probability differences / soft_rank_scale), an extension that is in neither paper nor code;
- ``L = CE(x) + L_val(x) + L_rank(x) + L_val(x_aug) + L_rank(x_aug)``: the KD terms on the clean
  batch and on an augmented copy, CE on the clean batch only [code].

Options (defaults [code]): temperature 4; value_weight κ_v 2; rank_weight κ_r 2; prune_rate 0.1;
ensemble_weight 0.7; augmentation cutmix (λ ~ Beta(1, 1)) | mixup (Beta(0.2, 0.2)) | cutout | none
(reproduce/augment.py; the code's autoaugment option is not implemented); rank_gradient none | soft;
soft_rank_scale 0.1; pruned_teacher_mode train (the code leaves the pruned copy in train() mode,
so it normalises with batch statistics and its BN running statistics drift) | eval.
Signals: ``loss_value``, ``loss_rank`` and ``pruned_sparsity`` (zero fraction of the pruned weights).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from reproduce.augment import AUGMENTATIONS
from reproduce.losses import correlation_value_loss, cross_entropy, rank_loss
from reproduce.methods.base import ConfigError, Method, Networks, Step, check_choice, register

PRUNABLE = (nn.Conv2d, nn.Linear)


def prune_smallest_weights(network: nn.Module, rate: float) -> None:
    """Zero the ``round(rate·n)`` smallest-magnitude entries of every Conv2d/Linear weight, layer by
    layer (torch.nn.utils.prune.l1_unstructured's count, applied once as a plain mask)."""
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, PRUNABLE):
                magnitudes = module.weight.abs().flatten()
                count = round(rate * magnitudes.numel())
                pruned = torch.zeros_like(magnitudes, dtype=torch.bool)
                pruned[magnitudes.topk(count, largest=False).indices] = True
                module.weight.masked_fill_(pruned.view_as(module.weight), 0.0)


def zero_weight_fraction(network: nn.Module) -> float:
    weights = [module.weight for module in network.modules() if isinstance(module, PRUNABLE)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@register
class R2KD(Method):
    name = "r2kd"
    online = False
    uses_pretrained_teacher = True

    @dataclass
    class Params:
        temperature: float = 4.0
        value_weight: float = 2.0  # κ_v
        rank_weight: float = 2.0  # κ_r
        prune_rate: float = 0.1
        ensemble_weight: float = 0.7  # weight of the unpruned teacher in the ensemble
        augmentation: str = "cutmix"  # cutmix | mixup | cutout | none
        rank_gradient: str = "none"  # none (code: argsort ranks) | soft
        soft_rank_scale: float = 0.1
        pruned_teacher_mode: str = "train"  # train (code) | eval

        def validate(self) -> None:
            check_choice(self.augmentation, (*AUGMENTATIONS, "none"), "methods.r2kd.augmentation")
            check_choice(self.rank_gradient, ("none", "soft"), "methods.r2kd.rank_gradient")
            check_choice(self.pruned_teacher_mode, ("train", "eval"), "methods.r2kd.pruned_teacher_mode")
            if not 0.0 <= self.prune_rate < 1.0:
                raise ConfigError("methods.r2kd.prune_rate: must be in [0, 1)")
            if self.soft_rank_scale <= 0:
                raise ConfigError("methods.r2kd.soft_rank_scale: must be > 0")

    def __init__(self, networks: Networks, params: Params) -> None:
        super().__init__(networks, params)
        self.student = networks.student()
        self.teacher = networks.load_teacher()
        self.pruned_teacher = copy.deepcopy(self.teacher)
        prune_smallest_weights(self.pruned_teacher, params.prune_rate)
        self.pruned_sparsity = zero_weight_fraction(self.pruned_teacher)
        self.augment = AUGMENTATIONS.get(params.augmentation)  # None: no augmented view

    def roles(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def eval_networks(self) -> dict[str, nn.Module]:
        return {"student": self.student, "teacher": self.teacher, "pruned_teacher": self.pruned_teacher}

    def frozen(self) -> list[nn.Module]:
        return [self.teacher] + ([self.pruned_teacher] if self.params.pruned_teacher_mode == "eval" else [])

    def step(self, x: Tensor, y: Tensor, epoch: int) -> Step:
        student_logits = self.student(x)
        value, rank = self._distillation_terms(x, student_logits)
        if self.augment is not None:
            augmented = self.augment(x)
            augmented_value, augmented_rank = self._distillation_terms(augmented, self.student(augmented))
            value, rank = value + augmented_value, rank + augmented_rank
        return Step(
            losses={"student": {"ce": cross_entropy(student_logits, y), "value": value, "rank": rank}},
            signals={"loss_value": value.detach(), "loss_rank": rank.detach(),
                     "pruned_sparsity": self.pruned_sparsity},
        )

    def _distillation_terms(self, x: Tensor, student_logits: Tensor) -> tuple[Tensor, Tensor]:
        """``(L_val, L_rank)`` of one view against the teacher ensemble."""
        p = self.params
        with torch.no_grad():
            ensemble = p.ensemble_weight * self.teacher(x) + (1 - p.ensemble_weight) * self.pruned_teacher(x)
        soft_rank_scale = p.soft_rank_scale if p.rank_gradient == "soft" else None
        return (p.value_weight * correlation_value_loss(student_logits, ensemble, p.temperature),
                p.rank_weight * rank_loss(student_logits, ensemble, p.temperature, soft_rank_scale))
