"""fashion-mnist: the IDX files in torchvision's layout (``<raw_root>/FashionMNIST/raw/``), plain or gzipped."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np

from reproduce.data.errors import DataFormatError, DataNotFoundError
from reproduce.data.sources import SOURCES, ArrayData, Source, check_labels

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def fashion_mnist_dir(raw_root: Path) -> Path:
    return Path(raw_root) / "FashionMNIST" / "raw"


def _how_to_get(raw_root: Path) -> str:
    return (f"Pass --download where the network allows (torchvision fetches it into {raw_root}), or copy "
            f"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
            f"t10k-labels-idx1-ubyte (or their .gz files) from https://github.com/zalandoresearch/fashion-mnist "
            f"into {fashion_mnist_dir(raw_root)}.")


def _read_file_bytes(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as stream:
            return stream.read()
    except (EOFError, gzip.BadGzipFile, OSError) as error:
        raise DataFormatError(f"{path} is not a complete gzip file ({error}); the download was probably "
                              f"truncated: delete it and re-download (--download).") from error


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Parse one IDX file of unsigned bytes (plain or gzipped) into an array of its declared shape."""
    data = _read_file_bytes(path)
    if len(data) < 4:
        raise DataFormatError(f"{path} is truncated: {len(data)} bytes, shorter than the IDX header; "
                              f"delete it and re-download (--download).")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise DataFormatError(f"{path} has IDX magic number {magic}, expected {expected_magic}; it is not the "
                              f"file its name says (images are {IDX_IMAGES_MAGIC}, labels {IDX_LABELS_MAGIC}).")
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataFormatError(f"{path} is truncated inside its IDX header; delete it and re-download (--download).")
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    expected_bytes = math.prod(shape)
    found_bytes = len(data) - header_size
    if found_bytes != expected_bytes:
        problem = "truncated" if found_bytes < expected_bytes else "longer than its header declares"
        raise DataFormatError(f"{path} is {problem}: the header declares shape {list(shape)} ({expected_bytes} bytes) "
                              f"but {found_bytes} bytes follow it; delete it and re-download (--download).")
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def _idx_path(directory: Path, name: str, raw_root: Path) -> Path:
    """The uncompressed file if present, else the .gz torchvision downloads before extracting."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataNotFoundError(f"Fashion-MNIST file {directory / name} (or .gz) not found. {_how_to_get(raw_root)}")


def read_fashion_mnist(raw_root: Path, *, verify_md5: bool, progress: bool) -> ArrayData:
    directory = fashion_mnist_dir(raw_root)
    parts = {}
    for part, prefix in (("train", "train"), ("test", "t10k")):
        images_path = _idx_path(directory, f"{prefix}-images-idx3-ubyte", raw_root)
        labels_path = _idx_path(directory, f"{prefix}-labels-idx1-ubyte", raw_root)
        images = read_idx(images_path, IDX_IMAGES_MAGIC)
        labels = read_idx(labels_path, IDX_LABELS_MAGIC).astype(np.int64)
        if len(images) != len(labels):
            raise DataFormatError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} "
                                  f"labels; one of them is from another release: re-download both (--download).")
        check_labels(labels, len(CLASSES), labels_path)
        parts[part] = (images[:, None, :, :].copy(), labels)
    return ArrayData(
        train_images=parts["train"][0], train_labels=parts["train"][1],
        test_images=parts["test"][0], test_labels=parts["test"][1],
        class_names=list(CLASSES),
        source=f"Fashion-MNIST IDX files in {directory.resolve()}",
    )


def download_fashion_mnist(raw_root: Path) -> None:
    import torchvision.datasets

    torchvision.datasets.FashionMNIST(str(raw_root), download=True)


SOURCES.register(Source("fashion-mnist", read=read_fashion_mnist, download=download_fashion_mnist))
