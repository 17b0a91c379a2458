"""Pure distillation losses. No state, no modules: every function maps logits to a scalar.

Conventions (../METHODS.md): logits are ``[B, C]``; a KL divergence is summed over classes and
averaged over the batch ("batchmean": ``reduction='mean'`` would silently divide by C); the τ²
factor is included where the method defines one; targets that come from another network are
detached *inside* the function, so no caller can forget to.
"""

from __future__ import annotations

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
