"""Pure distillation losses that several methods share. No state, no modules: every loss maps logits
to a scalar; the helpers beside them return the per-sample terms that methods weight. The maths only
one method uses lives in that method's file (SwitOKD's switch in methods/switokd.py, R2KD's
correlation and rank terms in methods/r2kd.py, KDCL's ensembles in methods/kdcl.py).

Conventions (every method's file cites its sources): logits are ``[B, C]``; a KL divergence is summed over classes and
averaged over the batch ("batchmean": ``reduction='mean'`` would silently divide by C); the τ²
factor is included where the method defines one; targets that come from another network are
detached *inside* the function, so no caller can forget to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(z / τ)``, at least in float32: CUDA autocast already runs softmax in float32, CPU autocast
    would keep bf16 and shift KD terms by several percent."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.log_softmax(logits / temperature, dim=1)


def kl_per_sample(target_log_probs: Tensor, input_log_probs: Tensor) -> Tensor:
    """``KL(target ‖ input)`` for each row, ``[B]``; both arguments are log-probabilities."""
    return F.kl_div(input_log_probs, target_log_probs, reduction="none", log_target=True).sum(dim=1)


def entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Shannon entropy (nats) of ``softmax(logits / T)`` per row, ``[B]``."""
    logp = log_probs(logits, temperature)
    return -(logp.exp() * logp).sum(dim=1)


def kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Hinton's forward KD: ``τ²·KL(p_t^τ ‖ p_s^τ)`` with the teacher detached.

    Its gradient w.r.t. the student logits is ``τ·(p_s^τ − p_t^τ) / B`` (tested)."""
    return temperature**2 * forward_kl_per_sample(student, teacher, temperature).mean()


def reverse_kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Reverse (mode-seeking) KD: ``τ²·KL(p_s^τ ‖ p_t^τ)`` with the teacher detached."""
    return temperature**2 * reverse_kl_per_sample(student, teacher, temperature).mean()


def forward_kl_per_sample(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``KL(sg(p_t^τ) ‖ p_s^τ)`` per row, without τ²."""
    return kl_per_sample(log_probs(teacher.detach(), temperature),
                         log_probs(student, temperature))


def reverse_kl_per_sample(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``KL(p_s^τ ‖ sg(p_t^τ))`` per row, without τ²: the gradient flows through the left side."""
    return kl_per_sample(log_probs(student, temperature),
                         log_probs(teacher.detach(), temperature))


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits, target)


def one_hot(target: Tensor, classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[B, classes]`` indicator of the labels. ``F.one_hot`` checks the labels' range on the host, which
    waits for the device every step; this scatter does not (an out-of-range label fails in the kernel)."""
    return torch.zeros(len(target), classes, dtype=dtype, device=target.device).scatter_(1, target[:, None], 1)


# ----------------------------------------------------------------------------------------------
# DKD (Zhao et al. 2022; mdistiller's formulation) and AEKT's per-sample use of it

NON_TARGET_MASK = 1000.0  # mdistiller subtracts this from the target logit to renormalise over the rest


def target_log_probability(logits: Tensor, target: Tensor, temperature: float) -> Tensor:
    """``log p^{y,τ}`` per row, ``[B]``."""
    return log_probs(logits, temperature).gather(1, target[:, None]).squeeze(1)


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
    target_mask = one_hot(target, student.shape[1], torch.bool)
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
