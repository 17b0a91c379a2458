"""tinyimagenet: the cs231n release (``tiny-imagenet-200/``), decoded at prepare time (64x64 JPEGs)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from reproduce.data.errors import DataFormatError, DataNotFoundError
from reproduce.data.sources import SOURCES, ArrayData, Source

FOLDER = "tiny-imagenet-200"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
ZIP_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
SIZE = 64


def _how_to_get(raw_root: Path) -> str:
    return (f"Pass --download where the network allows, or download {URL} and unzip it into "
            f"{raw_root} (giving {Path(raw_root) / FOLDER}/wnids.txt, train/, val/).")


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def decode_rgb(paths: Sequence[Path], size: int, *, progress: bool, description: str) -> np.ndarray:
    """Decode image files into uint8 [N, 3, size, size]; grayscale images become three equal channels."""
    images = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for position, path in enumerate(tqdm(paths, desc=description, unit="img", disable=not progress)):
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except OSError as error:
            raise DataFormatError(f"{path} could not be decoded ({error}); re-download the dataset.") from error
        if rgb.size != (size, size):
            raise DataFormatError(f"{path} is {rgb.size[0]}x{rgb.size[1]}, expected {size}x{size}; "
                                  f"it is not from the official release: re-download the dataset.")
        images[position] = np.asarray(rgb).transpose(2, 0, 1)
    return images


def read_tinyimagenet(raw_root: Path, *, verify_md5: bool, progress: bool) -> ArrayData:
    """Train = the 500 images per class; test = the official val set (the test labels are not public).

    Labels index the wnids sorted, as an ImageFolder over train/ would number them.
    """
    root = Path(raw_root) / FOLDER
    wnids_path, annotations_path = root / "wnids.txt", root / "val" / "val_annotations.txt"
    for required in (wnids_path, root / "train", annotations_path):
        if not required.exists():
            raise DataNotFoundError(f"Tiny ImageNet not found: {required} is missing. {_how_to_get(raw_root)}")
    wnids = sorted(_read_lines(wnids_path))
    if len(set(wnids)) != len(wnids):
        raise DataFormatError(f"{wnids_path} lists a wnid twice; re-download the dataset.")
    label_of = {wnid: label for label, wnid in enumerate(wnids)}

    words_path = root / "words.txt"
    words = dict(line.split("\t", 1) for line in _read_lines(words_path) if "\t" in line) if words_path.exists() else {}
    class_names = [words.get(wnid, wnid).strip() for wnid in wnids]

    train_paths: list[Path] = []
    train_labels: list[int] = []
    for wnid in wnids:
        class_paths = sorted((root / "train" / wnid / "images").glob("*.JPEG"))
        if not class_paths:
            raise DataFormatError(f"no training images in {root / 'train' / wnid / 'images'}; "
                                  f"the copy is incomplete: {_how_to_get(raw_root)}")
        train_paths.extend(class_paths)
        train_labels.extend([label_of[wnid]] * len(class_paths))

    test_paths: list[Path] = []
    test_labels: list[int] = []
    for line_number, line in enumerate(_read_lines(annotations_path), start=1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            raise DataFormatError(f"{annotations_path} line {line_number} ({line!r}) does not name an image and one "
                                  f"of the wnids in {wnids_path}; re-download the dataset.")
        test_paths.append(root / "val" / "images" / fields[0])
        test_labels.append(label_of[fields[1]])

    return ArrayData(
        train_images=decode_rgb(train_paths, SIZE, progress=progress, description="tinyimagenet train"),
        train_labels=np.array(train_labels, dtype=np.int64),
        test_images=decode_rgb(test_paths, SIZE, progress=progress, description="tinyimagenet val"),
        test_labels=np.array(test_labels, dtype=np.int64),
        class_names=class_names,
        source=f"Tiny ImageNet (cs231n release) in {root.resolve()}; test = its official val set",
    )


def download_tinyimagenet(raw_root: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(URL, download_root=str(raw_root), md5=ZIP_MD5)


SOURCES.register(Source("tinyimagenet", read=read_tinyimagenet, download=download_tinyimagenet))
