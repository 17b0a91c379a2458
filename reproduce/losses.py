"""Pure distillation losses. No state, no modules: every loss maps logits to a scalar; the helpers
beside them return the per-sample terms and batch statistics that methods weight or switch on.

Conventions (../METHODS.md): logits are ``[B, C]``; a KL divergence is summed over classes and
averaged over the batch ("batchmean": ``reduction='mean'`` would silently divide by C); the τ²
factor is included where the method defines one; targets that come from another network are
detached *inside* the function, so no caller can forget to.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def kl_per_sample(target_log_probs: Tensor, input_log_probs: Tensor) -> Tensor:
    """``KL(target ‖ input)`` for each row, ``[B]``; both arguments are log-probabilities."""
    return F.kl_div(input_log_probs, target_log_probs, reduction="none", log_target=True).sum(dim=1)


def entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Shannon entropy (nats) of ``softmax(logits / T)`` per row, ``[B]``."""
    log_probs = F.log_softmax(logits / temperature, dim=1)
    return -(log_probs.exp() * log_probs).sum(dim=1)


def kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Hinton's forward KD: ``τ²·KL(p_t^τ ‖ p_s^τ)`` with the teacher detached.

    Its gradient w.r.t. the student logits is ``τ·(p_s^τ − p_t^τ) / B`` (tested)."""
    return temperature**2 * forward_kl_per_sample(student, teacher, temperature).mean()


def reverse_kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Reverse (mode-seeking) KD: ``τ²·KL(p_s^τ ‖ p_t^τ)`` with the teacher detached."""
    return temperature**2 * reverse_kl_per_sample(student, teacher, temperature).mean()


def forward_kl_per_sample(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``KL(sg(p_t^τ) ‖ p_s^τ)`` per row, without τ²."""
    return kl_per_sample(F.log_softmax(teacher.detach() / temperature, dim=1),
                         F.log_softmax(student / temperature, dim=1))


def reverse_kl_per_sample(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``KL(p_s^τ ‖ sg(p_t^τ))`` per row, without τ²: the gradient flows through the left side."""
    return kl_per_sample(F.log_softmax(student / temperature, dim=1),
                         F.log_softmax(teacher.detach() / temperature, dim=1))


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits, target)


# ----------------------------------------------------------------------------------------------
# DKD (Zhao et al. 2022; mdistiller's formulation) and AEKT's per-sample use of it

NON_TARGET_MASK = 1000.0  # mdistiller subtracts this from the target logit to renormalise over the rest


def target_log_probability(logits: Tensor, target: Tensor, temperature: float) -> Tensor:
    """``log p^{y,τ}`` per row, ``[B]``."""
    return F.log_softmax(logits / temperature, dim=1).gather(1, target[:, None]).squeeze(1)


def _target_vs_rest_log_probs(scaled_logits: Tensor, target_mask: Tensor) -> Tensor:
    """``log [p^y, 1 − p^y]`` per row, ``[B, 2]``; ``1 − p^y`` as a logsumexp over the other classes so a
    confident network does not produce ``log 0``."""
    log_probs = F.log_softmax(scaled_logits, dim=1)
    log_target = log_probs.masked_fill(~target_mask, float("-inf")).logsumexp(dim=1)
    log_rest = log_probs.masked_fill(target_mask, float("-inf")).logsumexp(dim=1)
    return torch.stack([log_target, log_rest], dim=1)


def dkd_parts(student: Tensor, teacher: Tensor, target: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """DKD's two per-sample terms, ``(TCKD [B], NCKD [B])``, without τ², teacher detached.

    ``TCKD = KL(b_t ‖ b_s)`` over the binary ``b = [p^y, 1 − p^y]``; ``NCKD = KL(p̂_t ‖ p̂_s)`` over the
    distribution renormalised on the non-target classes. ``KL(p_t‖p_s) = TCKD + (1 − p_t^y)·NCKD`` (tested)."""
    teacher = teacher.detach()
    target_mask = F.one_hot(target, student.shape[1]).bool()
    scaled_student, scaled_teacher = student / temperature, teacher / temperature
    tckd = kl_per_sample(_target_vs_rest_log_probs(scaled_teacher, target_mask),
                         _target_vs_rest_log_probs(scaled_student, target_mask))
    masked = NON_TARGET_MASK * target_mask
    nckd = kl_per_sample(F.log_softmax(scaled_teacher - masked, dim=1), F.log_softmax(scaled_student - masked, dim=1))
    return tckd, nckd


def dkd_loss(student: Tensor, teacher: Tensor, target: Tensor, alpha: float, beta: float,
             temperature: float) -> Tensor:
    """Decoupled KD: ``τ²·(α·TCKD + β·NCKD)``, batch means, teacher detached."""
    tckd, nckd = dkd_parts(student, teacher, target, temperature)
    return temperature**2 * (alpha * tckd.mean() + beta * nckd.mean())


# ----------------------------------------------------------------------------------------------
# BD-KD: a per-sample balance of forward and reverse KL


def balanced_kd_loss(student: Tensor, teacher: Tensor, forward_weight: Tensor, temperature: float) -> Tensor:
    """``τ²·mean_i[w_i·KL(sg(p_t)‖p_s)_i + (1 − w_i)·KL(p_s‖sg(p_t))_i]``; ``w`` (``[B]``) is detached."""
    weight = forward_weight.detach()
    forward = forward_kl_per_sample(student, teacher, temperature)
    reverse = reverse_kl_per_sample(student, teacher, temperature)
    return temperature**2 * (weight * forward + (1 - weight) * reverse).mean()


# ----------------------------------------------------------------------------------------------
# SwitOKD's switch (hfutqian/SwitOKD): L1 distances of softmax outputs at τ = 1, batch means, detached

SWITOKD_EPSILON_FORMS = ("code", "paper")


def switokd_distances(student: Tensor, teacher: Tensor, target: Tensor) -> tuple[float, float, float]:
    """``(s, t, G)``: ``s = mean‖p_s − e_y‖₁``, ``t = mean‖p_t − e_y‖₁``, ``G = mean‖p_s − p_t‖₁``."""
    with torch.no_grad():
        student_probs, teacher_probs = F.softmax(student.float(), dim=1), F.softmax(teacher.float(), dim=1)
        one_hot = F.one_hot(target, student.shape[1]).float()
        distances = torch.stack([(student_probs - one_hot).abs().sum(1).mean(),
                                 (teacher_probs - one_hot).abs().sum(1).mean(),
                                 (student_probs - teacher_probs).abs().sum(1).mean()])
    s, t, gap = distances.tolist()  # one host sync: the switch is a Python decision
    return s, t, gap


def switokd_threshold(student_distance: float, teacher_distance: float, eps_form: str = "code") -> tuple[float, float]:
    """``(δ, ε)`` with ``δ = s − ε·t``; ``ε = exp(−t/(t + s))`` in the code, ``exp(−t/s)`` in the paper's Fig. 1."""
    s, t = student_distance, teacher_distance
    denominator = {"code": t + s, "paper": s}[eps_form]
    epsilon = math.exp(-t / max(denominator, 1e-12))  # both distances are 0 only for exact one-hot outputs
    return s - epsilon * t, epsilon


def switokd_gap_threshold(student: Tensor, teacher: Tensor, target: Tensor,
                          eps_form: str = "code") -> tuple[float, float, float]:
    """SwitOKD's gap ``G``, adaptive threshold ``δ`` and ``ε``, as floats."""
    s, t, gap = switokd_distances(student, teacher, target)
    threshold, epsilon = switokd_threshold(s, t, eps_form)
    return gap, threshold, epsilon


# ----------------------------------------------------------------------------------------------
# R2KD (Seonghak35/R2KD): correlation distance on values, Spearman correlation on ranks


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
    """``1 − mean_i ρ_i`` between the class rankings of student and (detached) teacher.

    ``soft_rank_scale=None`` ranks by argsort as the official code does, so the term has no gradient;
    a scale ranks the student's tempered log-probabilities softly so the term trains it."""
    teacher_ranks = hard_ranks(teacher.detach())
    if soft_rank_scale is None:
        student_ranks = hard_ranks(student.detach())
    else:
        student_ranks = soft_ranks(F.log_softmax(student / temperature, dim=1), soft_rank_scale)
    return 1 - spearman_correlation(student_ranks, teacher_ranks).mean()
