"""R2KD, Robustness-Reinforced KD (Kim et al., IEEE TKDE 2024, arXiv 2311.13934) [code: Seonghak35/R2KD].

Offline. The target is an ensemble of the trained teacher T and a pruned copy of it:
``z̃ = w·z_T + (1 − w)·z_pruned`` with w = 0.7, where the pruned teacher is T with 10% of every
Conv2d/Linear weight tensor (classifier included; biases and BatchNorm untouched) zeroed by
layer-wise L1 unstructured magnitude pruning, once, with no fine-tuning [code]. With
``p_s = softmax(z_s/τ)`` and ``q = softmax(z̃/τ)``:

- ``L_val = κ_v·τ²·[mean_i d(p_s[i], q[i]) + mean_c d(p_s[:, c], q[:, c])]``, the uncentred
  correlation distance ``d(a, b) = 1 − |⟨a,b⟩|/(‖a‖‖b‖ + 1e-8)`` over rows and over columns [code];
- ``L_rank = κ_r·(1 − mean_i ρ_i)``, Spearman's ρ between the class rankings of each row of
  ``p_s`` and ``q`` (the code ranks ``softmax(z/τ)``, not the logits: the same order within a row
  unless probabilities underflow into ties) [code]. The code ranks by argsort, so this term has no
  gradient: it is logged, not learned (rank_gradient none). rank_gradient soft ranks the student
  softly instead (σ of pairwise log-probability differences / soft_rank_scale), an extension that
  is in neither paper nor code;
- ``L = CE(x) + L_val(x) + L_rank(x) + L_val(x_aug) + L_rank(x_aug)``: the KD terms on the clean
  batch and on an augmented copy, CE on the clean batch only [code].

Options (defaults [code]): temperature 4; value_weight κ_v 2; rank_weight κ_r 2; prune_rate 0.1;
ensemble_weight 0.7; augmentation cutmix (λ ~ Beta(1, 1)) | mixup (Beta(0.2, 0.2)) | cutout | none
(reproduce/data/augment.py; the code's autoaugment and cutmixpick options are not implemented);
rank_gradient none | soft; soft_rank_scale 0.1; pruned_teacher_mode train (the code leaves the pruned
copy in train() mode, so it normalises with batch statistics and its BN running statistics drift) | eval.
Signals: ``loss_value``, ``loss_rank`` and ``pruned_sparsity`` (zero fraction of the pruned weights).

Recipe. The official repository ships configurations for Tiny-ImageNet only (configs/tiny/r2kd/,
which use the CRD schedule; the coefficients above are its mdistiller/engine/cfg.py defaults). The
CIFAR-100 recipe here follows the CRD recipe that the paper states it uses (240 epochs, batch 64,
lr 0.05, 0.01 for MobileNetV2/ShuffleNet students, ×0.1 at 150/180/210, weight decay 5e-4).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reproduce.data.augment import AUGMENTATIONS
from reproduce.losses import cross_entropy
from reproduce.methods.base import ConfigError, Method, MethodKind, Networks, Step, check_choice, register

PRUNABLE = (nn.Conv2d, nn.Linear)


# -- the value term: correlation distance over rows and columns ----------------------------------


def correlation_distance(a: Tensor, b: Tensor) -> Tensor:
    """R2KD's uncentred correlation distance ``1 − |⟨a_i, b_i⟩| / (‖a_i‖‖b_i‖ + 1e-8)``, mean over rows;
    ``b`` is the target (detached). The absolute value makes ``b`` and ``−b`` equally close."""
    b = b.detach()
    cosine = (a * b).sum(dim=1).abs() / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)
    return (1 - cosine).mean()


def correlation_value_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``τ²·[d(rows) + d(columns)]`` of the softened outputs: per sample, and per class over the batch."""
    student_probs = F.softmax(student / temperature, dim=1)
    teacher_probs = F.softmax(teacher.detach() / temperature, dim=1)
    return temperature**2 * (correlation_distance(student_probs, teacher_probs)
                             + correlation_distance(student_probs.T, teacher_probs.T))


# -- the rank term: Spearman correlation of the class rankings ------------------------------------


def hard_ranks(values: Tensor) -> Tensor:
    """Rank 1..C of each entry within its row (argsort of argsort): piecewise constant, no gradient."""
    return values.argsort(dim=1).argsort(dim=1).float() + 1


def soft_ranks(values: Tensor, scale: float) -> Tensor:
    """Differentiable ranks ``0.5 + Σ_j σ((v_i − v_j)/scale)``, which tend to the hard ranks as
    ``scale → 0``. Memory is ``B·C²`` (fine for CIFAR, heavy for ImageNet's 1000 classes)."""
    return 0.5 + torch.sigmoid((values[:, :, None] - values[:, None, :]) / scale).sum(dim=2)


def spearman_correlation(ranks_a: Tensor, ranks_b: Tensor) -> Tensor:
    """Pearson correlation of rank rows (Spearman's ρ without ties), ``[B]``."""
    centred_a = ranks_a - ranks_a.mean(dim=1, keepdim=True)
    centred_b = ranks_b - ranks_b.mean(dim=1, keepdim=True)
    return (centred_a * centred_b).sum(dim=1) / (centred_a.norm(dim=1) * centred_b.norm(dim=1) + 1e-8)


def rank_loss(student: Tensor, teacher: Tensor, temperature: float, soft_rank_scale: float | None = None) -> Tensor:
    """``1 − mean_i ρ_i`` between the class rankings of ``softmax(z_s/τ)`` and the (detached)
    ``softmax(z_t/τ)``, as the code ranks them.

    ``soft_rank_scale=None`` ranks by argsort as the official code does, so the term has no gradient;
    a scale ranks the student's tempered log-probabilities softly so the term trains it."""
    teacher_ranks = hard_ranks(F.softmax(teacher.detach() / temperature, dim=1))
    if soft_rank_scale is None:
        student_ranks = hard_ranks(F.softmax(student.detach() / temperature, dim=1))
    else:
        student_ranks = soft_ranks(F.log_softmax(student / temperature, dim=1), soft_rank_scale)
    return 1 - spearman_correlation(student_ranks, teacher_ranks).mean()


# -- the pruned teacher ---------------------------------------------------------------------------


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
    display_name = "R2KD"
    kind = MethodKind.OFFLINE
    row_order = 34
    # rank_weight is left out: with rank_gradient none (the code's) the rank term has no gradient,
    # so its weight cannot change training, only the logged loss.
    search_space = {
        "temperature": {"type": "float", "low": 1, "high": 8},
        "value_weight": {"type": "float", "low": 0.5, "high": 4, "log": True},
        "prune_rate": {"type": "float", "low": 0.0, "high": 0.3},
        "ensemble_weight": {"type": "float", "low": 0.5, "high": 1.0},
    }

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
        augment = AUGMENTATIONS.get(params.augmentation)  # None: no augmented view
        # Its box and mixing coefficient are drawn on the host from torch's CPU generator (the code's draws): run
        # eagerly, outside a compiled step, which would otherwise compile a new graph for every new box.
        self.augment = torch.compiler.disable(augment) if augment is not None else None

    def roles(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def eval_networks(self) -> dict[str, nn.Module]:
        return {"student": self.student, "teacher": self.teacher, "pruned_teacher": self.pruned_teacher}

    def frozen(self) -> list[nn.Module]:
        return [self.teacher] + ([self.pruned_teacher] if self.params.pruned_teacher_mode == "eval" else [])

    def step(self, x: Tensor, y: Tensor, epoch: int | Tensor) -> Step:
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
