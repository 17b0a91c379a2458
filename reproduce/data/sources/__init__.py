"""Readers of the datasets' real upstream on-disk formats, one file per dataset, registered by name.

Each reader returns the official training and test parts plus the class names, exactly as the
upstream files hold them; ``prepare`` turns that into the suite's cache. Every format is parsed
here (IDX, the CIFAR pickles, the Tiny ImageNet folders, ImageFolder) rather than through
torchvision's dataset classes, so that the same code reads the real data and the small fixtures
the tests write. torchvision is used only to download.

Adding a dataset is adding a file here that ends with ``SOURCES.register(Source("name", read=..., download=...))``.
Nothing in this package imports torch at import time, so listing the names (``SOURCES.names()``, which the
config uses to validate ``dataset.name``) stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reproduce.data.errors import DataFormatError, DataNotFoundError
from reproduce.registry import Registry


@dataclass(frozen=True)
class ArrayData:
    """A dataset small enough to hold decoded in memory ("tensor" storage)."""

    train_images: np.ndarray  # uint8 [N, C, H, W]
    train_labels: np.ndarray  # int64 [N]
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]
    source: str

    @property
    def storage(self) -> str:
        return "tensor"


@dataclass(frozen=True)
class FileData:
    """A dataset streamed from its image files ("files" storage); paths are relative to ``root``."""

    root: Path
    train_files: list[str]
    train_labels: np.ndarray  # int64 [N]
    test_files: list[str]
    test_labels: np.ndarray
    class_names: list[str]
    source: str

    @property
    def storage(self) -> str:
        return "files"


RawData = ArrayData | FileData
Reader = Callable[..., RawData]  # (raw_root, *, verify_md5, progress) -> RawData


@dataclass(frozen=True)
class Source:
    name: str
    read: Reader
    download: Callable[[Path], None] | None = None  # None: nothing to download (digits) or not allowed (imagenet)


SOURCES: Registry[Source] = Registry("dataset", "reproduce.data.sources")


def check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataFormatError(f"{path} has labels outside 0..{num_classes - 1} "
                              f"(found {labels.min()}..{labels.max()}); the file is corrupt: re-download it.")


def read_source(name: str, raw_root: Path, *, download: bool, verify_md5: bool, progress: bool) -> RawData:
    """Read dataset ``name`` from ``raw_root``; with ``download``, fetch it first if it is missing."""
    source = SOURCES.get(name, "dataset.name")
    try:
        return source.read(Path(raw_root), verify_md5=verify_md5, progress=progress)
    except DataNotFoundError as missing:
        if not download or source.download is None:
            raise
        try:
            Path(raw_root).mkdir(parents=True, exist_ok=True)
            source.download(Path(raw_root))
        except (OSError, RuntimeError) as error:
            raise DataNotFoundError(f"Downloading {name} into {raw_root} failed ({error}). {missing}") from error
    return source.read(Path(raw_root), verify_md5=verify_md5, progress=progress)
