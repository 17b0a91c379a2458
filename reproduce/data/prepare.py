"""The prepared-dataset cache: ``prepare`` materialises it once, ``load_prepared`` reads it every run.

Layout of ``<out_root>/<name>/``:

- ``train.pt``, ``val.pt``, ``test.pt`` ("tensor" storage): ``{"images": uint8 [N, C, H, W], "labels": int64}``;
  or ``train.json``, ``val.json``, ``test.json`` ("files" storage, ImageNet-scale):
  ``{"paths": [...], "labels": [...]}`` with paths relative to the manifest's ``files_root``.
- ``manifest.json``: what the cache holds and how it was made (see ``prepare``), with the sha256 of every file.

``val`` is a fixed, seeded, stratified part of the official training set, the one hyper-parameter sweeps score
on; ``test`` is the official test set, only ever evaluated.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

import numpy as np
import torch

from reproduce.data.errors import DataFormatError, DataNotFoundError, DataNotPreparedError
from reproduce.data.sources import ArrayData, FileData, read_source
from reproduce.data.split import stratified_split
from reproduce.errors import ConfigError
from reproduce.io import atomic_torch_save, atomic_write_text

FORMAT_VERSION = 1
PARTS = ("train", "val", "test")
MANIFEST = "manifest.json"

# "files" storage is never decoded at prepare time, so it normalises with the standard ImageNet statistics.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
FILES_IMAGE_SHAPE = [3, 224, 224]  # nominal: the loader crops to the configured image_size

_STATS_CHUNK = 4096  # images per float64 block: Tiny ImageNet at once would need ~10 GB


@dataclass
class Split:
    """An in-memory ("tensor" storage) split."""

    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]


@dataclass
class FileSplit:
    """A ("files" storage, ImageNet-scale) split streamed from disk; paths are absolute."""

    paths: list[str]
    labels: list[int]


@dataclass
class Prepared:
    train: Split | FileSplit
    val: Split | FileSplit
    test: Split | FileSplit
    manifest: dict
    directory: Path  # where it was read from (the streaming loader keeps its decoded evaluation views beside it)

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def in_channels(self) -> int:
        return int(self.manifest["image_shape"][0])

    @property
    def storage(self) -> str:
        return str(self.manifest["storage"])


# ----------------------------------------------------------------------------------------------
# Writing


def prepare(name: str, raw_root: Path, out_root: Path, *, val_fraction: float, split_seed: int,
            download: bool = False, verify_md5: bool = True, progress: bool = True) -> Path:
    """Materialise dataset ``name`` into ``out_root/name/`` and return that directory.

    The raw data is read completely before anything is written, and the cache is built in a temporary
    sibling directory that replaces ``out_root/name`` only once it is complete, so a failed or interrupted
    prepare never leaves a half-written cache and never damages a previous good one.
    """
    _check_val_fraction(val_fraction)
    raw = read_source(name, Path(raw_root), download=download, verify_md5=verify_md5, progress=progress)
    kept, held_out = stratified_split(raw.train_labels, val_fraction, split_seed)
    if val_fraction > 0 and len(held_out) == 0:
        raise ConfigError(f"dataset.val_fraction={val_fraction} leaves no validation images for {name} "
                         f"(each class holds out round(val_fraction * its size)); raise it.")

    target = Path(out_root) / name
    with _staging_directory(target) as staging:
        if isinstance(raw, ArrayData):
            contents = _write_tensor_cache(staging, raw, kept, held_out)
        else:
            contents = _write_file_cache(staging, raw, kept, held_out)
        manifest = {
            "dataset": name,
            "storage": raw.storage,
            "num_classes": len(raw.class_names),
            "class_names": raw.class_names,
            **contents,
            "val_fraction": val_fraction,
            "split_seed": split_seed,
            "source": raw.source,
            "sha256": {file: _sha256(staging / file) for file in contents["files"].values()},
            "format_version": FORMAT_VERSION,
        }
        atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return target


def _check_val_fraction(val_fraction: float) -> None:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, Real) or not 0 <= val_fraction < 1:
        raise ConfigError(f"dataset.val_fraction must be a number in [0, 1), the share of the official training "
                         f"set held out for validation (0: none, the papers' protocol); got {val_fraction!r}")


@contextmanager
def _staging_directory(target: Path) -> Iterator[Path]:
    """Yield an empty sibling of ``target``; on success it becomes ``target``, on failure it is deleted."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not target.exists():
        staging.rename(target)
        return
    # Directories cannot be swapped in one rename: move the old cache aside first, and put it back if the
    # new one cannot take its place.
    previous = target.with_name(f".{target.name}.previous-{uuid.uuid4().hex}")
    target.rename(previous)
    try:
        staging.rename(target)
    except BaseException:
        previous.rename(target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(previous)


def _write_split(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    atomic_torch_save({"images": torch.from_numpy(np.ascontiguousarray(images)),
                       "labels": torch.from_numpy(labels.astype(np.int64))}, path)


def _write_index(path: Path, files: list[str], labels: np.ndarray) -> None:
    atomic_write_text(path, json.dumps({"paths": files, "labels": labels.tolist()}))


def _write_tensor_cache(staging: Path, raw: ArrayData, kept: np.ndarray, held_out: np.ndarray) -> dict:
    parts = {
        "train": (raw.train_images[kept], raw.train_labels[kept]),
        "val": (raw.train_images[held_out], raw.train_labels[held_out]),
        "test": (raw.test_images, raw.test_labels),
    }
    files = {}
    for part, (images, labels) in parts.items():
        files[part] = f"{part}.pt"
        _write_split(staging / files[part], images, labels)
    mean, std = channel_mean_std(parts["train"][0])
    return {
        "files": files,
        "image_shape": list(raw.train_images.shape[1:]),
        "counts": {part: len(labels) for part, (_, labels) in parts.items()},
        "mean": mean,
        "std": std,
    }


def _write_file_cache(staging: Path, raw: FileData, kept: np.ndarray, held_out: np.ndarray) -> dict:
    parts = {
        "train": ([raw.train_files[i] for i in kept], raw.train_labels[kept]),
        "val": ([raw.train_files[i] for i in held_out], raw.train_labels[held_out]),
        "test": (raw.test_files, raw.test_labels),
    }
    files = {}
    for part, (paths, labels) in parts.items():
        files[part] = f"{part}.json"
        _write_index(staging / files[part], paths, labels)
    return {
        "files": files,
        "files_root": str(raw.root),
        "image_shape": FILES_IMAGE_SHAPE,
        "counts": {part: len(labels) for part, (_, labels) in parts.items()},
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }


def channel_mean_std(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of uint8 NCHW images, in [0, 1] units."""
    channels = images.shape[1]
    total = np.zeros(channels)
    total_squares = np.zeros(channels)
    for start in range(0, len(images), _STATS_CHUNK):
        block = images[start:start + _STATS_CHUNK].astype(np.float64) / 255
        total += block.sum(axis=(0, 2, 3))
        total_squares += np.square(block).sum(axis=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_squares / count - mean**2, 0.0))
    return mean.tolist(), std.tolist()


def _sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


# ----------------------------------------------------------------------------------------------
# Reading


def prepare_command(directory: Path) -> str:
    """The command that makes the prepared cache ``directory`` (``<prepared_root>/<dataset name>``) when given the
    other --params/--set options of the command that needs it (they carry the roots and the split)."""
    return f"python -m reproduce prepare --set dataset.name={Path(directory).name}"


def load_prepared(directory: Path, *, verify: bool = False) -> Prepared:
    """Read a prepared cache; ``verify=True`` re-checks the sha256 of its files against the manifest.

    A missing cache is a ``DataNotPreparedError`` naming the ``prepare`` command for this dataset; a damaged one
    (unreadable, truncated, modified) a ``DataFormatError`` naming the file and how to rebuild it."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    command = prepare_command(directory)
    if not manifest_path.is_file():
        raise DataNotPreparedError(f"no prepared dataset at {directory} (no {MANIFEST}); run `{command}` with this "
                                   f"command's other --params/--set options to create it.")
    rebuild = f"delete {directory} and run `{command}` (with this command's other --params/--set options) again"
    manifest = _read_json(manifest_path, rebuild)
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise DataFormatError(f"{manifest_path} has format_version {found!r}, this code reads {FORMAT_VERSION}; "
                              f"{rebuild}.")
    try:
        return _load_parts(directory, manifest, verify, rebuild)
    except (KeyError, TypeError) as error:  # a manifest of the right version that lacks a field or mistypes one
        raise DataFormatError(f"{manifest_path} lacks or mistypes {error}; {rebuild}.") from error


def _load_parts(directory: Path, manifest: dict, verify: bool, rebuild: str) -> Prepared:
    if verify:
        for file, expected in manifest["sha256"].items():
            actual = _sha256(directory / file)
            if actual != expected:
                raise DataFormatError(f"{directory / file} has sha256 {actual}, but {MANIFEST} records {expected}: "
                                      f"the cache was modified or damaged; {rebuild}.")
    parts = {}
    for part in PARTS:
        path = directory / manifest["files"][part]
        if not path.is_file():
            raise DataNotFoundError(f"{path} is missing from the prepared cache; {rebuild}.")
        if manifest["storage"] == "tensor":
            parts[part] = _read_split(path, rebuild)
        else:
            parts[part] = _read_index(path, Path(manifest["files_root"]), rebuild)
        if len(parts[part].labels) != manifest["counts"][part]:
            raise DataFormatError(f"{path} holds {len(parts[part].labels)} samples, {MANIFEST} records "
                                  f"{manifest['counts'][part]}; {rebuild}.")
    return Prepared(train=parts["train"], val=parts["val"], test=parts["test"], manifest=manifest, directory=directory)


# What torch.load and json raise on a file that is not what it should be (truncated, overwritten, random bytes;
# torch reports a truncated archive as OSError EINVAL).
_UNREADABLE = (OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError,
               AttributeError, IndexError)


def _reason(error: Exception) -> str:
    """The error's kind (and an OS error's own words: "Permission denied"), never torch's text, whose advice
    (weights_only=False) is the wrong fix for a damaged cache."""
    return f"{type(error).__name__}: {error.strerror}" if isinstance(error, OSError) else type(error).__name__


def _read_json(path: Path, rebuild: str) -> object:
    try:
        return json.loads(path.read_text())
    except _UNREADABLE as error:
        raise DataFormatError(f"{path} is not valid JSON ({_reason(error)}): the prepared cache is damaged; "
                              f"{rebuild}.") from None


def _read_split(path: Path, rebuild: str) -> Split:
    try:
        content = torch.load(path, weights_only=True)
    except _UNREADABLE as error:
        raise DataFormatError(f"{path} is not a readable prepared split ({_reason(error)}): the prepared "
                              f"cache is damaged; {rebuild}.") from None
    images, labels = (content.get("images"), content.get("labels")) if isinstance(content, dict) else (None, None)
    if (not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor) or images.dtype != torch.uint8
            or images.dim() != 4 or labels.dtype != torch.int64 or len(labels) != len(images)):
        raise DataFormatError(f"{path} does not hold uint8 NCHW images with matching int64 labels; {rebuild}.")
    return Split(images=images, labels=labels)


def _read_index(path: Path, files_root: Path, rebuild: str) -> FileSplit:
    content = _read_json(path, rebuild)
    if not isinstance(content, dict) or len(content.get("paths", ())) != len(content.get("labels", ())):
        raise DataFormatError(f"{path} is not an index of paths with matching labels; {rebuild}.")
    return FileSplit(paths=[str(files_root / file) for file in content["paths"]], labels=list(content["labels"]))
