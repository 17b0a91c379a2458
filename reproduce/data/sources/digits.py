"""digits: scikit-learn's bundled copy of the UCI optical digits (needs no files and no download)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reproduce.data.sources import SOURCES, ArrayData, Source
from reproduce.data.split import stratified_split

TEST_FRACTION = 0.25
TEST_SEED = 0  # constant, independent of split_seed: the test set must never move


def read_digits(raw_root: Path, *, verify_md5: bool, progress: bool) -> ArrayData:
    """The 1,797 real 8x8 digits shipped inside scikit-learn; needs no files, so ignores the arguments."""
    import sklearn  # imported here: listing the datasets should not pay for it
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are counts 0..16 of set bits in 4x4 blocks; scale them to the uint8 range.
    images = np.rint(digits.images * 255 / 16).astype(np.uint8)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    train, test = stratified_split(labels, TEST_FRACTION, TEST_SEED)
    return ArrayData(
        train_images=images[train], train_labels=labels[train],
        test_images=images[test], test_labels=labels[test],
        class_names=[str(digit) for digit in range(10)],
        source=(f"scikit-learn {sklearn.__version__} load_digits (UCI optical digits, 1,797 images); "
                f"test = fixed stratified {TEST_FRACTION:.0%} (seed {TEST_SEED})"),
    )


SOURCES.register(Source("digits", read=read_digits))
