"""Training batches for "files" storage (ImageNet-scale): images decoded per epoch, normalised on the device.

Two decoders, one augmentation. By default DataLoader workers (one per core: ``runtime.num_workers: 0``) decode
with PIL and crop; with ``dataset.gpu_decode`` the workers only read the files' bytes and the training device
decodes each batch in one ``torchvision.io.decode_jpeg`` call (nvjpeg on CUDA). Either way a sample's view (the
RandomResizedCrop box and the flip, the standard ImageNet recipe) is drawn by ``draw_view`` from a generator
seeded by ``(seed, epoch, index)``, so ``epoch(n)`` yields the same views whichever worker or device decodes,
and an exact resume needs no saved loader state. Batches travel as uint8 in channels-last layout (HWC is what
decoders produce, and bytes are 4x cheaper to copy than floats); ``Normalise`` turns them into the compute dtype
on the device. Evaluation views are decoded once into a cache (reproduce/data/eval_cache.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file

from reproduce.config import DatasetConfig
from reproduce.data.errors import DataFormatError
from reproduce.data.loader import Normalise
from reproduce.data.prepare import FileSplit, Prepared
from reproduce.errors import ConfigError

TRAIN_SCALE = (0.08, 1.0)  # RandomResizedCrop's area fraction and aspect ratio range (torchvision's defaults,
TRAIN_RATIO = (3 / 4, 4 / 3)  # the standard ImageNet training recipe)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed derived from several integers, stable across processes and Python versions."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class View:
    """Which part of an image a training sample sees: a box (RandomResizedCrop) and whether it is mirrored."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def draw_view(image: Image.Image | Tensor, seed: int, epoch: int, index: int) -> View:
    """Sample ``index``'s view in ``epoch``: a function of those, ``seed`` and the image's size only.

    torchvision draws from the global torch RNG: it is seeded per sample inside a fork, so the caller's RNG
    stream is left untouched. The draws are RandomResizedCrop's then RandomHorizontalFlip's, in that order."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(seed, epoch, index))
        top, left, height, width = transforms.RandomResizedCrop.get_params(image, list(TRAIN_SCALE), list(TRAIN_RATIO))
        flip = bool(torch.rand(1) < 0.5)
    return View(top, left, height, width, flip)


def apply_view(image: Image.Image | Tensor, view: View, size: int) -> Image.Image | Tensor:
    """The view cropped and resized (bilinear, antialiased) to ``size`` x ``size``, mirrored if drawn so."""
    out = TF.resized_crop(image, view.top, view.left, view.height, view.width, [size, size], antialias=True)
    return TF.hflip(out) if view.flip else out


def open_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        raise DataFormatError(f"{path} could not be decoded ({error}); replace it with the original file.") from None


def hwc_tensor(image: Image.Image) -> Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8))


def channels_last_batch(hwc_images: Sequence[Tensor]) -> Tensor:
    """uint8 HWC images -> an NCHW batch in channels-last layout: a plain copy, no transposition."""
    return torch.stack(list(hwc_images)).permute(0, 3, 1, 2)


class DecodedImages(Dataset):
    """Workers decode with PIL and apply the view; a request is ``(epoch, index)``.

    The epoch travels with the request (instead of living in the dataset) so that persistent workers, which
    hold their own copy of the dataset, still draw every sample's view for the right epoch."""

    def __init__(self, split: FileSplit, image_size: int, seed: int) -> None:
        self.split, self.image_size, self.seed = split, image_size, seed

    def __len__(self) -> int:
        return len(self.split.paths)

    def __getitem__(self, request: tuple[int, int]) -> tuple[Tensor, int]:
        epoch, index = request
        image = open_rgb(self.split.paths[index])
        view = draw_view(image, self.seed, epoch, index)
        return hwc_tensor(apply_view(image, view, self.image_size)), self.split.labels[index]

    @staticmethod
    def collate(samples: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
        images, labels = zip(*samples)
        return channels_last_batch(images), torch.tensor(labels)


class EncodedImages(Dataset):
    """Workers only read the files' bytes; the training device decodes (``dataset.gpu_decode``)."""

    def __init__(self, split: FileSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split.paths)

    def __getitem__(self, request: tuple[int, int]) -> tuple[Tensor, int, int]:
        _, index = request
        return read_file(self.split.paths[index]), self.split.labels[index], index

    @staticmethod
    def collate(samples: list[tuple[Tensor, int, int]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The batch's files back to back in one tensor (a worker hands over one shared-memory block per
        tensor, and a descriptor per file would exhaust them), with their sizes, labels and indices."""
        data, labels, indices = zip(*samples)
        return torch.cat(data), torch.tensor([len(item) for item in data]), torch.tensor(labels), torch.tensor(indices)


def decode_batch(data: list[Tensor], device: torch.device, paths: Sequence[str]) -> list[Tensor]:
    """Decode encoded images (read from ``paths``) to uint8 RGB CHW on ``device``: the whole batch in one call
    (nvjpeg's batched decode on CUDA). A batch holding a file that decoder cannot read (ImageNet's train set has
    a PNG and some CMYK JPEGs among its .JPEG files) is decoded image by image, such files by the CPU's general
    decoder."""
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return [_decode_one(item, device, path) for item, path in zip(data, paths)]


def _decode_one(data: Tensor, device: torch.device, path: str) -> Tensor:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    try:
        return decode_image(data, mode=ImageReadMode.RGB).to(device)
    except RuntimeError as error:
        raise DataFormatError(f"{path} could not be decoded ({error}); replace it with the original file.") from None


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` requests for this rank's shard of one training epoch.

    A permutation seeded by ``(seed, epoch)``, truncated to a multiple of ``world_size`` and dealt round-robin,
    so every rank gets the same number of samples (DDP needs equal step counts)."""

    def __init__(self, size: int, *, seed: int, rank: int, world_size: int) -> None:
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard(self) -> list[int]:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator)
        usable = self.size - self.size % self.world_size
        return order[:usable][self.rank::self.world_size].tolist()

    def __len__(self) -> int:
        return self.size // self.world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, index) for index in self.shard())


class StreamingLoader:
    """``epoch(n)`` yields training ``(images, labels)`` on ``device``: images normalised by ``normalise`` (its
    dtype and memory format), the last partial batch dropped (a ragged step would skew BatchNorm).

    ``num_workers``: DataLoader processes (0: in this process). ``decode_device``: None decodes in the workers
    with PIL; a device decodes there (the training GPU for ``dataset.gpu_decode``; the CPU in tests)."""

    def __init__(self, split: FileSplit, *, batch_size: int, image_size: int, normalise: Normalise,
                 device: torch.device, seed: int, num_workers: int = 0, decode_device: torch.device | None = None,
                 rank: int = 0, world_size: int = 1) -> None:
        if not split.paths:
            raise ValueError("the split has no images; re-run `python -m reproduce prepare`")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
        self.split, self.batch_size, self.image_size, self.seed = split, batch_size, image_size, seed
        self.normalise, self.device, self.decode_device = normalise, device, decode_device
        self.sampler = EpochSampler(len(split.paths), seed=seed, rank=rank, world_size=world_size)
        dataset = EncodedImages(split) if decode_device is not None else DecodedImages(split, image_size, seed)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=dataset.collate,
            drop_last=True,
            pin_memory=device.type == "cuda" and decode_device is None,
            persistent_workers=num_workers > 0,
            # The loader draws its workers' base seeds from this generator rather than the global RNG.
            generator=torch.Generator().manual_seed(seed),
        )

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        self.sampler.set_epoch(epoch)
        for batch in self.loader:
            images, labels = self._decoded(batch, epoch) if self.decode_device is not None else batch
            yield self.normalise(images.to(self.device, non_blocking=True)), labels.to(self.device, non_blocking=True)

    def _decoded(self, batch: tuple[Tensor, Tensor, Tensor, Tensor], epoch: int) -> tuple[Tensor, Tensor]:
        data, sizes, labels, indices = batch
        indices = indices.tolist()
        files = list(torch.split(data, sizes.tolist()))
        images = decode_batch(files, self.decode_device, [self.split.paths[index] for index in indices])
        views = [apply_view(image, draw_view(image, self.seed, epoch, index), self.image_size)
                 for image, index in zip(images, indices)]
        return channels_last_batch([view.permute(1, 2, 0) for view in views]), labels


def streaming_loaders(prepared: Prepared, evaluated: list[tuple[str, FileSplit]], dataset: DatasetConfig, *,
                      normalise: Normalise, batch_size: int, eval_batch_size: int, device: torch.device, seed: int,
                      num_workers: int, rank: int, world_size: int) -> tuple[StreamingLoader, dict]:
    """make_loaders for "files" storage: the streamed training batches and the cached evaluation views."""
    from reproduce.data.eval_cache import CachedEvalLoader

    if dataset.gpu_decode and device.type != "cuda":
        raise ConfigError(f"dataset.gpu_decode: decoding on the GPU needs a CUDA training device, not {device}; "
                          f"set dataset.gpu_decode: false (the workers decode) or train on a GPU")
    train = StreamingLoader(prepared.train, batch_size=batch_size, image_size=dataset.image_size, normalise=normalise,
                            device=device, seed=seed, num_workers=num_workers,
                            decode_device=device if dataset.gpu_decode else None, rank=rank, world_size=world_size)
    evaluation = {name: CachedEvalLoader(prepared, name, split, image_size=dataset.image_size,
                                         batch_size=eval_batch_size, normalise=normalise, device=device,
                                         num_workers=num_workers)
                  for name, split in evaluated}
    return train, evaluation
