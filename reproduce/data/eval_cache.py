"""Evaluation views of "files" storage, decoded once into a uint8 cache that every epoch and run reuses.

The evaluation view (shorter side resized to image_size / 0.875, then the central image_size square: 256 ->
224) never changes, so decoding the 50,000 ImageNet validation JPEGs at every evaluation is wasted work. The
first loader that needs a split's views decodes them with DataLoader workers into
``<prepared_root>/<dataset>-decoded/<split>-<size>px-<key>.npy`` (uint8 [N, size, size, 3], read memory-mapped);
later epochs and runs read that file. It sits beside the prepared folder, not inside it: the prepared folder is
a DVC stage output, and a file added there would mark the stage changed and make ``dvc repro`` retrain every
method. ``key`` hashes the split's index (its sha256 in the manifest) and the view's definition, so a
re-prepared dataset or another image size gets a cache of its own; older caches of the same split and size are
removed when a new one is complete. Writers take a file lock (DDP ranks start together) and write a temporary
file that is renamed into place, so a reader never sees half a cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm import tqdm

from reproduce.data.loader import Normalise
from reproduce.data.prepare import FileSplit, Prepared
from reproduce.data.streaming import hwc_tensor, open_rgb
from reproduce.io import atomic_path, clean_temporaries

EVAL_CROP_FRACTION = 0.875  # resize to image_size / 0.875 (256 for 224), then center-crop: the standard eval view
CACHE_FORMAT = 1  # part of the key: bump it when the view or the file layout changes
_DECODE_BATCH = 64


def eval_transform(image_size: int) -> transforms.Compose:
    return transforms.Compose([transforms.Resize(int(image_size / EVAL_CROP_FRACTION)),
                               transforms.CenterCrop(image_size)])


class EvalImages(Dataset):
    def __init__(self, split: FileSplit, image_size: int) -> None:
        self.split, self.transform = split, eval_transform(image_size)

    def __len__(self) -> int:
        return len(self.split.paths)

    def __getitem__(self, index: int) -> Tensor:
        return hwc_tensor(self.transform(open_rgb(self.split.paths[index])))


def cache_path(prepared: Prepared, part: str, image_size: int) -> Path:
    index_sha256 = prepared.manifest["sha256"][prepared.manifest["files"][part]]
    definition = f"{index_sha256}:{image_size}:{EVAL_CROP_FRACTION}:{CACHE_FORMAT}"
    key = hashlib.blake2b(definition.encode(), digest_size=8).hexdigest()
    directory = prepared.directory.with_name(f"{prepared.directory.name}-decoded")
    return directory / f"{part}-{image_size}px-{key}.npy"


def decoded_views(prepared: Prepared, part: str, split: FileSplit, *, image_size: int,
                  num_workers: int) -> np.ndarray:
    """The split's evaluation views, uint8 [N, size, size, 3] memory-mapped, decoded now if not cached yet."""
    path = cache_path(prepared, part, image_size)
    shape = (len(split.paths), image_size, image_size, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_name(f".{path.name}.lock")):
        if not _complete(path, shape):
            clean_temporaries(path.parent)  # what killed decodes left (as large as the cache)
            _decode_into(path, split, shape, num_workers)
            for stale in path.parent.glob(f"{part}-{image_size}px-*.npy"):
                if stale != path:
                    stale.unlink()
    return np.load(path, mmap_mode="r")


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _complete(path: Path, shape: tuple[int, ...]) -> bool:
    if not path.is_file():
        return False
    try:
        cached = np.load(path, mmap_mode="r")
    except (OSError, ValueError):  # not a .npy file (damaged): decode again
        return False
    return cached.shape == shape and cached.dtype == np.uint8


def _decode_into(path: Path, split: FileSplit, shape: tuple[int, ...], num_workers: int) -> None:
    with atomic_path(path) as partial:  # a killed decode leaves a temporary that the next decode removes
        views = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
        with open(partial, "r+b") as stream:  # the space now: a full disk under a memory map is a SIGBUS later
            os.posix_fallocate(stream.fileno(), 0, os.fstat(stream.fileno()).st_size)
        loader = DataLoader(EvalImages(split, shape[1]), batch_size=_DECODE_BATCH, num_workers=num_workers,
                            collate_fn=torch.stack)
        start = 0
        with tqdm(total=shape[0], desc=f"decoding {path.stem} once", unit="img", disable=None) as progress:
            for batch in loader:
                views[start:start + len(batch)] = batch.numpy()
                start += len(batch)
                progress.update(len(batch))
        views.flush()
        del views


class CachedEvalLoader:
    """``epoch(n)`` yields a split's evaluation views in order, the last partial batch kept, normalised on
    ``device``; the views come from the decoded cache (``decoded_views``)."""

    def __init__(self, prepared: Prepared, part: str, split: FileSplit, *, image_size: int, batch_size: int,
                 normalise: Normalise, device: torch.device, num_workers: int) -> None:
        self.views = decoded_views(prepared, part, split, image_size=image_size, num_workers=num_workers)
        self.labels = torch.tensor(split.labels, dtype=torch.int64, device=device)
        self.batch_size, self.normalise, self.device = batch_size, normalise, device

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self.labels), self.batch_size):
            # A copy out of the read-only map, in pinned memory on CUDA so the upload does not block.
            hwc = torch.from_numpy(np.array(self.views[start:start + self.batch_size]))
            if self.device.type == "cuda":
                hwc = hwc.pin_memory()
            images = hwc.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # NCHW, channels-last layout
            yield self.normalise(images), self.labels[start:start + self.batch_size]
