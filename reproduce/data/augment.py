"""Batch augmentations that run on the training device, for R2KD's second (augmented) view.

They follow the official R2KD code (Seonghak35/R2KD, mdistiller/distillers/R2KD.py): one mixing
coefficient, one partner permutation and one box per *batch*, not per image. They act on normalised
images, so cutout's hole is filled with 0, the dataset mean. Every draw comes from torch's global RNG
(scalars from the CPU generator, the permutation from the device's), which the engine checkpoints,
so a resumed run draws the same boxes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _beta(alpha: float) -> float:
    return float(torch.distributions.Beta(alpha, alpha).sample())


def _randint(high: int) -> int:
    return int(torch.randint(high, ()))


def _partners(images: Tensor) -> Tensor:
    return images[torch.randperm(images.shape[0], device=images.device)]


def _box(height: int, width: int, side_fraction: float) -> tuple[slice, slice]:
    """A box of about ``side_fraction`` of each side around a uniform centre, clipped to the image
    (the code's rand_bbox, so a box near an edge is smaller)."""
    half_h, half_w = int(height * side_fraction) // 2, int(width * side_fraction) // 2
    centre_y, centre_x = _randint(height), _randint(width)
    return (slice(max(centre_y - half_h, 0), min(centre_y + half_h, height)),
            slice(max(centre_x - half_w, 0), min(centre_x + half_w, width)))


def cutmix(images: Tensor, alpha: float = 1.0) -> Tensor:
    """CutMix: a box covering about ``1 − λ`` of the area, λ ~ Beta(α, α), pasted from a shuffled batch."""
    rows, cols = _box(images.shape[2], images.shape[3], (1.0 - _beta(alpha)) ** 0.5)
    mixed = images.clone()
    mixed[:, :, rows, cols] = _partners(images)[:, :, rows, cols]
    return mixed


def mixup(images: Tensor, alpha: float = 0.2) -> Tensor:
    """mixup: ``λ·x + (1 − λ)·x[perm]`` with λ ~ Beta(α, α)."""
    lam = _beta(alpha)
    return lam * images + (1.0 - lam) * _partners(images)


def cutout(images: Tensor) -> Tensor:
    """Cutout: one square hole of a quarter of the side (the code's 8 px at 32, 16 px at 64)."""
    rows, cols = _box(images.shape[2], images.shape[3], 0.25)
    holed = images.clone()
    holed[:, :, rows, cols] = 0.0
    return holed


AUGMENTATIONS: dict[str, Callable[[Tensor], Tensor]] = {"cutmix": cutmix, "mixup": mixup, "cutout": cutout}
