"""The seeded, stratified split of a labelled set, used for the validation carve-out and digits' test set."""

from __future__ import annotations

import hashlib
import math

import numpy as np


def _rank_key(seed: int, index: int) -> bytes:
    return hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()


def stratified_split(labels: np.ndarray, held_out_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into sorted ``(kept, held_out)``, holding out round(fraction * n) of every class.

    Members of a class are ranked by a keyed hash of ``(seed, index)`` rather than drawn from a
    library RNG, so the split depends on the seed alone and no numpy or torch upgrade can move it.
    Every class keeps at least one sample.
    """
    kept: list[int] = []
    held_out: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label).tolist()
        n_held_out = min(math.floor(len(members) * held_out_fraction + 0.5), len(members) - 1)
        ranked = sorted(members, key=lambda index: _rank_key(seed, index))
        held_out.extend(ranked[:n_held_out])
        kept.extend(ranked[n_held_out:])
    return np.array(sorted(kept), dtype=np.int64), np.array(sorted(held_out), dtype=np.int64)
