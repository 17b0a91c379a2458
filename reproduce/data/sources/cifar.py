"""cifar10 / cifar100: the "python version" pickles, read without running any code they could carry."""

from __future__ import annotations

import functools
import hashlib
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reproduce.data.errors import DataFormatError, DataNotFoundError
from reproduce.data.sources import SOURCES, ArrayData, Source, check_labels


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

ROW_BYTES = 3 * 32 * 32  # one image: the R, G and B planes, each 32x32 row-major


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


def _how_to_get(release: CifarRelease, raw_root: Path) -> str:
    return (f"Pass --download where the network allows (torchvision fetches it into {raw_root}), or download "
            f"{release.archive_url} and extract it into {raw_root}.")


def _load_pickle(path: Path, release: CifarRelease, required_keys: Sequence[bytes]) -> dict:
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


def _read_batches(paths: Sequence[Path], release: CifarRelease) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for path in paths:
        batch = _load_pickle(path, release, (b"data", release.labels_key))
        data = np.asarray(batch[b"data"])
        batch_labels = np.asarray(batch[release.labels_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW_BYTES:
            raise DataFormatError(f"{path}: b'data' is {data.dtype} {list(data.shape)}, expected uint8 "
                                  f"[N, {ROW_BYTES}]; the file is corrupt: re-download it (--download).")
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
                                f"{_how_to_get(release, raw_root)}")
    if verify_md5:
        for name, md5 in expected:
            _check_md5(directory / name, md5, release)
    meta = _load_pickle(directory / release.meta_file[0], release, (release.names_key,))
    class_names = [name.decode() if isinstance(name, bytes) else str(name) for name in meta[release.names_key]]
    train_images, train_labels = _read_batches([directory / name for name, _ in release.train_files], release)
    test_images, test_labels = _read_batches([directory / name for name, _ in release.test_files], release)
    check_labels(train_labels, len(class_names), directory / release.train_files[0][0])
    check_labels(test_labels, len(class_names), directory / release.test_files[0][0])
    return ArrayData(
        train_images=train_images, train_labels=train_labels,
        test_images=test_images, test_labels=test_labels,
        class_names=class_names,
        source=f"{release.name} python pickles in {directory.resolve()}"
               + ("" if verify_md5 else " (md5 verification skipped)"),
    )


def download_cifar(release: CifarRelease, raw_root: Path) -> None:
    import torchvision.datasets

    getattr(torchvision.datasets, release.torchvision_class)(str(raw_root), download=True)


SOURCES.register(Source("cifar10", read=functools.partial(read_cifar, CIFAR10),
                        download=functools.partial(download_cifar, CIFAR10)))
SOURCES.register(Source("cifar100", read=functools.partial(read_cifar, CIFAR100),
                        download=functools.partial(download_cifar, CIFAR100)))
