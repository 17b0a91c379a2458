"""Readers of the datasets' real upstream on-disk formats.

Each reader returns the official training and test parts plus the class names, exactly as the
upstream files hold them; ``prepare`` turns that into the suite's cache. Every format is parsed
here (IDX, the CIFAR pickles, the Tiny ImageNet folders, ImageFolder) rather than through
torchvision's dataset classes, so that the same code reads the real data and the small fixtures
the tests write. torchvision is used only to download.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import pickle
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm


class DataNotFoundError(FileNotFoundError):
    """The dataset's files are not where the upstream layout puts them."""


class DataFormatError(ValueError):
    """Files exist but are not what the upstream format promises (truncated, corrupt, modified)."""


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


# ----------------------------------------------------------------------------------------------
# Splitting


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


# ----------------------------------------------------------------------------------------------
# digits: scikit-learn's bundled copy of the UCI optical digits

DIGITS_TEST_FRACTION = 0.25
DIGITS_TEST_SEED = 0  # constant, independent of split_seed: the test set must never move


def read_digits(raw_root: Path, *, verify_md5: bool, progress: bool) -> ArrayData:
    """The 1,797 real 8x8 digits shipped inside scikit-learn; needs no files, so ignores the arguments."""
    import sklearn  # imported here: the other datasets should not pay for it
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are counts 0..16 of set bits in 4x4 blocks; scale them to the uint8 range.
    images = np.rint(digits.images * 255 / 16).astype(np.uint8)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    train, test = stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
    return ArrayData(
        train_images=images[train], train_labels=labels[train],
        test_images=images[test], test_labels=labels[test],
        class_names=[str(digit) for digit in range(10)],
        source=(f"scikit-learn {sklearn.__version__} load_digits (UCI optical digits, 1,797 images); "
                f"test = fixed stratified {DIGITS_TEST_FRACTION:.0%} (seed {DIGITS_TEST_SEED})"),
    )


# ----------------------------------------------------------------------------------------------
# fashion-mnist: IDX files in torchvision's layout

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def fashion_mnist_dir(raw_root: Path) -> Path:
    return Path(raw_root) / "FashionMNIST" / "raw"


def _fashion_mnist_how_to_get(raw_root: Path) -> str:
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
    raise DataNotFoundError(f"Fashion-MNIST file {directory / name} (or .gz) not found. "
                            f"{_fashion_mnist_how_to_get(raw_root)}")


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
        _check_labels(labels, len(FASHION_MNIST_CLASSES), labels_path)
        parts[part] = (images[:, None, :, :].copy(), labels)
    return ArrayData(
        train_images=parts["train"][0], train_labels=parts["train"][1],
        test_images=parts["test"][0], test_labels=parts["test"][1],
        class_names=list(FASHION_MNIST_CLASSES),
        source=f"Fashion-MNIST IDX files in {directory.resolve()}",
    )


def _download_fashion_mnist(raw_root: Path) -> None:
    import torchvision.datasets

    torchvision.datasets.FashionMNIST(str(raw_root), download=True)


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataFormatError(f"{path} has labels outside 0..{num_classes - 1} "
                              f"(found {labels.min()}..{labels.max()}); the file is corrupt: re-download it.")


# ----------------------------------------------------------------------------------------------
# cifar10 / cifar100: the "python version" pickles


@dataclass(frozen=True)
class CifarRelease:
    name: str
    folder: str
    archive_url: str
    train_files: tuple[tuple[str, str], ...]  # (file name, official md5)
    test_files: tuple[tuple[str, str], ...]
    meta_file: tuple[str, str]
    labels_key: bytes
    names_key: bytes
    torchvision_class: str


CIFAR10 = CifarRelease(
    name="CIFAR-10",
    folder="cifar-10-batches-py",
    archive_url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    train_files=(("data_batch_1", "c99cafc152244af753f735de768cd75f"),
                 ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
                 ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
                 ("data_batch_4", "634d18415352ddfa80567beed471001a"),
                 ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")),
    test_files=(("test_batch", "40351d587109b95175f43aff81a1287e"),),
    meta_file=("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
    labels_key=b"labels",
    names_key=b"label_names",
    torchvision_class="CIFAR10",
)

CIFAR100 = CifarRelease(
    name="CIFAR-100",
    folder="cifar-100-python",
    archive_url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    train_files=(("train", "16019d7e3df5f24257cddd939b257f8d"),),
    test_files=(("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
    meta_file=("meta", "7973b15100ade9c7d40fb424638fde48"),
    labels_key=b"fine_labels",
    names_key=b"fine_label_names",
    torchvision_class="CIFAR100",
)

CIFAR_ROW_BYTES = 3 * 32 * 32  # one image: the R, G and B planes, each 32x32 row-major


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR ships as pickles, and a pickle can run arbitrary code: allow only what a numpy array needs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # pickles written with numpy < 2 (the official files)
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 spells bytes in protocol-2 pickles
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR pickle")
        return super().find_class(module, name)


def _cifar_how_to_get(release: CifarRelease, raw_root: Path) -> str:
    return (f"Pass --download where the network allows (torchvision fetches it into {raw_root}), or download "
            f"{release.archive_url} and extract it into {raw_root}.")


def _load_cifar_pickle(path: Path, release: CifarRelease, required_keys: Sequence[bytes]) -> dict:
    try:
        with path.open("rb") as stream:
            content = _NumpyOnlyUnpickler(stream, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise DataFormatError(f"{path} could not be read as a {release.name} pickle ({type(error).__name__}: "
                              f"{error}); the file is truncated or corrupt: delete it and re-download (--download).") \
            from error
    if not isinstance(content, dict) or any(key not in content for key in required_keys):
        raise DataFormatError(f"{path} is not a {release.name} pickle: expected a dict with keys "
                              f"{[key.decode() for key in required_keys]}; re-download it (--download).")
    return content


def _check_md5(path: Path, expected: str, release: CifarRelease) -> None:
    with path.open("rb") as stream:
        actual = hashlib.file_digest(stream, "md5").hexdigest()
    if actual != expected:
        raise DataFormatError(f"{path} has md5 {actual}, not the official {release.name} md5 {expected}: the file "
                              f"is corrupt or not from the official release. Delete it and re-download (--download), "
                              f"or pass --no-verify-md5 if you use modified files on purpose.")


def _read_cifar_batches(paths: Sequence[Path], release: CifarRelease) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for path in paths:
        batch = _load_cifar_pickle(path, release, (b"data", release.labels_key))
        data = np.asarray(batch[b"data"])
        batch_labels = np.asarray(batch[release.labels_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_ROW_BYTES:
            raise DataFormatError(f"{path}: b'data' is {data.dtype} {list(data.shape)}, expected uint8 "
                                  f"[N, {CIFAR_ROW_BYTES}]; the file is corrupt: re-download it (--download).")
        if len(batch_labels) != len(data):
            raise DataFormatError(f"{path}: {len(data)} images but {len(batch_labels)} labels; the file is corrupt: "
                                  f"re-download it (--download).")
        # A row is three 32x32 planes back to back, so a plain reshape gives channels-first images.
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


def read_cifar(release: CifarRelease, raw_root: Path, *, verify_md5: bool, progress: bool) -> ArrayData:
    directory = Path(raw_root) / release.folder
    expected = [*release.train_files, *release.test_files, release.meta_file]
    missing = [name for name, _ in expected if not (directory / name).is_file()]
    if missing:
        raise DataNotFoundError(f"{release.name} not found: {directory} lacks {', '.join(missing)}. "
                                f"{_cifar_how_to_get(release, raw_root)}")
    if verify_md5:
        for name, md5 in expected:
            _check_md5(directory / name, md5, release)
    meta_path = directory / release.meta_file[0]
    meta = _load_cifar_pickle(meta_path, release, (release.names_key,))
    class_names = [name.decode() if isinstance(name, bytes) else str(name) for name in meta[release.names_key]]
    train_images, train_labels = _read_cifar_batches([directory / name for name, _ in release.train_files], release)
    test_images, test_labels = _read_cifar_batches([directory / name for name, _ in release.test_files], release)
    _check_labels(train_labels, len(class_names), directory / release.train_files[0][0])
    _check_labels(test_labels, len(class_names), directory / release.test_files[0][0])
    return ArrayData(
        train_images=train_images, train_labels=train_labels,
        test_images=test_images, test_labels=test_labels,
        class_names=class_names,
        source=f"{release.name} python pickles in {directory.resolve()}"
               + ("" if verify_md5 else " (md5 verification skipped)"),
    )


def _download_cifar(release: CifarRelease, raw_root: Path) -> None:
    import torchvision.datasets

    getattr(torchvision.datasets, release.torchvision_class)(str(raw_root), download=True)


# ----------------------------------------------------------------------------------------------
# tinyimagenet: the cs231n release

TINYIMAGENET_FOLDER = "tiny-imagenet-200"
TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINYIMAGENET_ZIP_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINYIMAGENET_SIZE = 64


def _tinyimagenet_how_to_get(raw_root: Path) -> str:
    return (f"Pass --download where the network allows, or download {TINYIMAGENET_URL} and unzip it into "
            f"{raw_root} (giving {Path(raw_root) / TINYIMAGENET_FOLDER}/wnids.txt, train/, val/).")


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
    root = Path(raw_root) / TINYIMAGENET_FOLDER
    wnids_path, annotations_path = root / "wnids.txt", root / "val" / "val_annotations.txt"
    for required in (wnids_path, root / "train", annotations_path):
        if not required.exists():
            raise DataNotFoundError(f"Tiny ImageNet not found: {required} is missing. "
                                    f"{_tinyimagenet_how_to_get(raw_root)}")
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
                                  f"the copy is incomplete: {_tinyimagenet_how_to_get(raw_root)}")
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
        train_images=decode_rgb(train_paths, TINYIMAGENET_SIZE, progress=progress, description="tinyimagenet train"),
        train_labels=np.array(train_labels, dtype=np.int64),
        test_images=decode_rgb(test_paths, TINYIMAGENET_SIZE, progress=progress, description="tinyimagenet val"),
        test_labels=np.array(test_labels, dtype=np.int64),
        class_names=class_names,
        source=f"Tiny ImageNet (cs231n release) in {root.resolve()}; test = its official val set",
    )


def _download_tinyimagenet(raw_root: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(TINYIMAGENET_URL, download_root=str(raw_root), md5=TINYIMAGENET_ZIP_MD5)


# ----------------------------------------------------------------------------------------------
# imagenet: ILSVRC-2012 in ImageFolder layout, indexed but not decoded

IMAGENET_FOLDER = "imagenet"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def _imagenet_how_to_get(raw_root: Path) -> str:
    root = Path(raw_root) / IMAGENET_FOLDER
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
    root = Path(raw_root) / IMAGENET_FOLDER
    for part in ("train", "val"):
        if not (root / part).is_dir() or not _class_folders(root / part):
            raise DataNotFoundError(f"ImageNet not found: {root / part} is missing or has no class folders. "
                                    f"{_imagenet_how_to_get(raw_root)}")
    wnids = _class_folders(root / "train")
    val_wnids = _class_folders(root / "val")
    if val_wnids != wnids:
        differing = sorted(set(wnids) ^ set(val_wnids))
        raise DataFormatError(f"{root / 'train'} and {root / 'val'} have different class folders "
                              f"(e.g. {differing[:5]}); both need the same wnid folders. "
                              f"{_imagenet_how_to_get(raw_root)}")
    train_files, train_labels = _list_image_folder(root, "train", wnids, progress)
    test_files, test_labels = _list_image_folder(root, "val", wnids, progress)
    return FileData(
        root=root.resolve(),
        train_files=train_files, train_labels=train_labels,
        test_files=test_files, test_labels=test_labels,
        class_names=wnids,
        source=f"ImageNet (ILSVRC-2012) ImageFolder in {root.resolve()}; test = its official val set",
    )


# ----------------------------------------------------------------------------------------------
# Registry

Reader = Callable[..., RawData]  # (raw_root, *, verify_md5, progress) -> RawData


@dataclass(frozen=True)
class Source:
    read: Reader
    download: Callable[[Path], None] | None  # None: nothing to download (digits) or not allowed (imagenet)


SOURCES: dict[str, Source] = {
    "digits": Source(read=read_digits, download=None),
    "fashion-mnist": Source(read=read_fashion_mnist, download=_download_fashion_mnist),
    "cifar10": Source(read=functools.partial(read_cifar, CIFAR10),
                      download=functools.partial(_download_cifar, CIFAR10)),
    "cifar100": Source(read=functools.partial(read_cifar, CIFAR100),
                       download=functools.partial(_download_cifar, CIFAR100)),
    "tinyimagenet": Source(read=read_tinyimagenet, download=_download_tinyimagenet),
    "imagenet": Source(read=read_imagenet, download=None),
}


def read_source(name: str, raw_root: Path, *, download: bool, verify_md5: bool, progress: bool) -> RawData:
    """Read dataset ``name`` from ``raw_root``; with ``download``, fetch it first if it is missing."""
    source = SOURCES[name]
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
