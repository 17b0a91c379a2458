"""Small, random but well-formed datasets written in the exact upstream on-disk formats.

Each writer returns what a correct reader must produce from the files it wrote, so tests can compare
pixel for pixel. Labels are balanced (every class appears ``n // num_classes`` times or once more).
"""

from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class WrittenArrays:
    """What a reader must return for an in-memory dataset."""

    train_images: np.ndarray  # uint8 [N, C, H, W]
    train_labels: np.ndarray  # int64 [N]
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]
    files: list[Path]  # every file written, for corruption tests


@dataclass
class WrittenFiles:
    """What a reader must return for an ImageFolder dataset; labels index the sorted wnids."""

    root: Path
    train_paths: list[Path]
    train_labels: np.ndarray
    test_paths: list[Path]
    test_labels: np.ndarray
    class_names: list[str]


def balanced_labels(count: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(count) % num_classes).astype(np.int64)


def random_images(count: int, channels: int, size: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(count, channels, size, size), dtype=np.uint8)


def fake_wnids(count: int) -> list[str]:
    return [f"n{1440764 + 7919 * index:08d}" for index in range(count)]


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST: IDX files, as torchvision lays them out


# Written from the format's definition rather than imported from the reader, so a wrong constant there fails.
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def write_fashion_mnist(root: Path, n_train: int = 60, n_test: int = 20, *, gz: bool = False,
                        seed: int = 0) -> WrittenArrays:
    """``root/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``, gzipped (only) when ``gz``."""
    rng = np.random.default_rng(seed)
    directory = Path(root) / "FashionMNIST" / "raw"
    directory.mkdir(parents=True, exist_ok=True)
    parts = {}
    files = []
    for prefix, count in (("train", n_train), ("t10k", n_test)):
        images = random_images(count, 1, 28, rng)[:, 0]
        labels = balanced_labels(count, 10, rng)
        for name, content in ((f"{prefix}-images-idx3-ubyte", idx_bytes(images, IDX_IMAGES_MAGIC)),
                              (f"{prefix}-labels-idx1-ubyte", idx_bytes(labels, IDX_LABELS_MAGIC))):
            path = directory / (f"{name}.gz" if gz else name)
            path.write_bytes(gzip.compress(content) if gz else content)
            files.append(path)
        parts[prefix] = (images[:, None], labels)
    return WrittenArrays(parts["train"][0], parts["train"][1], parts["t10k"][0], parts["t10k"][1],
                         list(FASHION_MNIST_CLASSES), files)


# ----------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100: the "python version" pickles (dicts with bytes keys, data uint8 [N, 3072])

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_batch(images: np.ndarray, labels: np.ndarray, labels_key: bytes, batch_label: str) -> dict:
    return {
        b"batch_label": batch_label.encode(),
        labels_key: labels.tolist(),
        # Row = R plane, then G, then B, each 32x32 row-major: exactly a C-order flatten of CHW.
        b"data": images.reshape(len(images), 3 * 32 * 32),
        b"filenames": [f"image_{index:05d}.png".encode() for index in range(len(images))],
    }


def _write_pickle(path: Path, content: dict) -> Path:
    # Protocol 2 is the closest a Python 3 writer gets to the original Python 2 pickles.
    path.write_bytes(pickle.dumps(content, protocol=2))
    return path


def write_cifar10(root: Path, n_train: int = 100, n_test: int = 20, *, seed: int = 0) -> WrittenArrays:
    """``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``."""
    rng = np.random.default_rng(seed)
    directory = Path(root) / "cifar-10-batches-py"
    directory.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = random_images(n_train, 3, 32, rng), balanced_labels(n_train, 10, rng)
    test_images, test_labels = random_images(n_test, 3, 32, rng), balanced_labels(n_test, 10, rng)
    files = []
    for number, batch in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        files.append(_write_pickle(directory / f"data_batch_{number}", _cifar_batch(
            train_images[batch], train_labels[batch], b"labels", f"training batch {number} of 5")))
    files.append(_write_pickle(directory / "test_batch", _cifar_batch(
        test_images, test_labels, b"labels", "testing batch 1 of 1")))
    files.append(_write_pickle(directory / "batches.meta", {
        b"num_cases_per_batch": 10000,
        b"label_names": [name.encode() for name in CIFAR10_NAMES],
        b"num_vis": 3072,
    }))
    return WrittenArrays(train_images, train_labels, test_images, test_labels, list(CIFAR10_NAMES), files)


def write_cifar100(root: Path, n_train: int = 300, n_test: int = 100, *, seed: int = 0) -> WrittenArrays:
    """``root/cifar-100-python/{train, test, meta}`` with fine and coarse labels."""
    rng = np.random.default_rng(seed)
    directory = Path(root) / "cifar-100-python"
    directory.mkdir(parents=True, exist_ok=True)
    fine_names = [f"fine_class_{index:02d}" for index in range(100)]
    parts = {}
    files = []
    for part, count in (("train", n_train), ("test", n_test)):
        images, labels = random_images(count, 3, 32, rng), balanced_labels(count, 100, rng)
        batch = _cifar_batch(images, labels, b"fine_labels", f"{part}ing batch 1 of 1")
        batch[b"coarse_labels"] = (labels // 5).tolist()
        files.append(_write_pickle(directory / part, batch))
        parts[part] = (images, labels)
    files.append(_write_pickle(directory / "meta", {
        b"fine_label_names": [name.encode() for name in fine_names],
        b"coarse_label_names": [f"coarse_class_{index:02d}".encode() for index in range(20)],
    }))
    return WrittenArrays(parts["train"][0], parts["train"][1], parts["test"][0], parts["test"][1], fine_names, files)


# ----------------------------------------------------------------------------------------------
# JPEG folders


def _write_jpeg(path: Path, pixels: np.ndarray) -> np.ndarray:
    """Write HWC (or HW grayscale) pixels as a JPEG; return the uint8 CHW RGB a PIL decoder reads back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).transpose(2, 0, 1).copy()


def _random_pixels(height: int, width: int, grayscale: bool, rng: np.random.Generator) -> np.ndarray:
    shape = (height, width) if grayscale else (height, width, 3)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def write_tinyimagenet(root: Path, n_classes: int = 3, per_class: int = 6, *, val_per_class: int = 2,
                       seed: int = 0) -> WrittenArrays:
    """``root/tiny-imagenet-200/``: wnids.txt, words.txt, train/<wnid>/images/*.JPEG, val/images + annotations.

    Like the real release, wnids.txt is not sorted, words.txt lists more wnids than the dataset uses, some
    images are grayscale JPEGs, and test/ holds unlabelled images a reader must ignore.
    """
    rng = np.random.default_rng(seed)
    directory = Path(root) / "tiny-imagenet-200"
    wnids = fake_wnids(n_classes)
    class_names = [f"thing {index}, object {index}" for index in range(n_classes)]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "wnids.txt").write_text("".join(f"{wnid}\n" for wnid in reversed(wnids)))
    (directory / "words.txt").write_text("n00001740\tentity\n" + "".join(
        f"{wnid}\t{name}\n" for wnid, name in zip(wnids, class_names)))

    train_images, train_labels, files = [], [], []
    for label, wnid in enumerate(wnids):
        boxes = []
        for index in range(per_class):
            path = directory / "train" / wnid / "images" / f"{wnid}_{index}.JPEG"
            train_images.append(_write_jpeg(path, _random_pixels(64, 64, index == 0, rng)))
            train_labels.append(label)
            files.append(path)
            boxes.append(f"{path.name}\t0\t0\t63\t63\n")
        (directory / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))

    test_images, annotations = [], []
    test_labels = balanced_labels(n_classes * val_per_class, n_classes, rng)
    for index, label in enumerate(test_labels):
        path = directory / "val" / "images" / f"val_{index}.JPEG"
        test_images.append(_write_jpeg(path, _random_pixels(64, 64, index == 1, rng)))
        annotations.append(f"{path.name}\t{wnids[label]}\t0\t0\t63\t63\n")
        files.append(path)
    (directory / "val" / "val_annotations.txt").write_text("".join(annotations))
    _write_jpeg(directory / "test" / "images" / "test_0.JPEG", _random_pixels(64, 64, False, rng))
    return WrittenArrays(np.stack(train_images), np.array(train_labels, dtype=np.int64),
                         np.stack(test_images), test_labels, class_names, files)


def write_imagenet(root: Path, n_classes: int = 3, per_class: int = 6, *, val_per_class: int = 2,
                   seed: int = 0) -> WrittenFiles:
    """``root/imagenet/{train,val}/<wnid>/*.JPEG`` (ImageFolder layout) with images of varied sizes."""
    rng = np.random.default_rng(seed)
    directory = Path(root) / "imagenet"
    wnids = fake_wnids(n_classes)
    paths: dict[str, list[Path]] = {"train": [], "val": []}
    labels: dict[str, list[int]] = {"train": [], "val": []}
    for part, count in (("train", per_class), ("val", val_per_class)):
        for label, wnid in enumerate(wnids):
            for index in range(count):
                path = directory / part / wnid / f"{wnid}_{part}_{index}.JPEG"
                height, width = rng.integers(40, 90, size=2)
                _write_jpeg(path, _random_pixels(int(height), int(width), index == 0, rng))
                paths[part].append(path)
                labels[part].append(label)
    return WrittenFiles(directory, paths["train"], np.array(labels["train"], dtype=np.int64),
                        paths["val"], np.array(labels["val"], dtype=np.int64), wnids)
