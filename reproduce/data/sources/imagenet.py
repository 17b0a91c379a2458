"""imagenet: ILSVRC-2012 in ImageFolder layout, indexed at prepare time but never decoded ("files" storage).

It cannot be downloaded automatically (the licence requires registering), so it has no ``download``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from reproduce.data.errors import DataFormatError, DataNotFoundError
from reproduce.data.sources import SOURCES, FileData, Source

FOLDER = "imagenet"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def _how_to_get(raw_root: Path) -> str:
    root = Path(raw_root) / FOLDER
    return (f"ImageNet cannot be downloaded automatically: its licence requires registering at https://image-net.org. "
            f"Put the ILSVRC-2012 images in ImageFolder layout at {root}/train/<wnid>/*.JPEG and "
            f"{root}/val/<wnid>/*.JPEG (the official val images sorted into wnid folders, e.g. with the widely "
            f"used valprep.sh).")


def _class_folders(directory: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())


def _list_image_folder(root: Path, part: str, wnids: list[str], progress: bool) -> tuple[list[str], np.ndarray]:
    files: list[str] = []
    labels: list[int] = []
    for label, wnid in enumerate(tqdm(wnids, desc=f"imagenet {part}", unit="class", disable=not progress)):
        names = sorted(entry.name for entry in os.scandir(root / part / wnid)
                       if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES))
        if not names:
            raise DataFormatError(f"{root / part / wnid} holds no images: the copy is incomplete; "
                                  f"copy that class's images there again.")
        files.extend(f"{part}/{wnid}/{name}" for name in names)
        labels.extend([label] * len(names))
    return files, np.array(labels, dtype=np.int64)


def read_imagenet(raw_root: Path, *, verify_md5: bool, progress: bool) -> FileData:
    """Class names are the wnids sorted (ImageFolder's numbering); test = the official val set."""
    root = Path(raw_root) / FOLDER
    for part in ("train", "val"):
        if not (root / part).is_dir() or not _class_folders(root / part):
            raise DataNotFoundError(f"ImageNet not found: {root / part} is missing or has no class folders. "
                                    f"{_how_to_get(raw_root)}")
    wnids = _class_folders(root / "train")
    val_wnids = _class_folders(root / "val")
    if val_wnids != wnids:
        differing = sorted(set(wnids) ^ set(val_wnids))
        raise DataFormatError(f"{root / 'train'} and {root / 'val'} have different class folders "
                              f"(e.g. {differing[:5]}); both need the same wnid folders. {_how_to_get(raw_root)}")
    train_files, train_labels = _list_image_folder(root, "train", wnids, progress)
    test_files, test_labels = _list_image_folder(root, "val", wnids, progress)
    return FileData(
        root=root.resolve(),
        train_files=train_files, train_labels=train_labels,
        test_files=test_files, test_labels=test_labels,
        class_names=wnids,
        source=f"ImageNet (ILSVRC-2012) ImageFolder in {root.resolve()}; test = its official val set",
    )


SOURCES.register(Source("imagenet", read=read_imagenet))
