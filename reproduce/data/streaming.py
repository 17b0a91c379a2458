"""Batches for "files" storage (ImageNet-scale): images decoded by DataLoader workers, normalised on the device.

Every random choice is a pure function of ``(seed, epoch)``: the order comes from a generator seeded by them, and
each sample's crop and flip from a generator seeded by ``(seed, epoch, index)``, whichever worker decodes it. So
``epoch(n)`` yields the same batches whenever it is called, and an exact resume needs no saved loader state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from reproduce.data.prepare import FileSplit

EVAL_CROP_FRACTION = 0.875  # resize to image_size / 0.875 (256 for 224), then center-crop: the standard eval view


def mix_seed(*parts: int) -> int:
    """A 63-bit seed derived from several integers, stable across processes and Python versions."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def train_transform(image_size: int) -> Callable[[Image.Image], Tensor]:
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.PILToTensor(),
    ])


def eval_transform(image_size: int) -> Callable[[Image.Image], Tensor]:
    return transforms.Compose([
        transforms.Resize(int(image_size / EVAL_CROP_FRACTION)),
        transforms.CenterCrop(image_size),
        transforms.PILToTensor(),
    ])


class FileSplitDataset(Dataset):
    """Decodes one image of a FileSplit per request; a request is ``(epoch, index)``.

    The epoch travels with the request (instead of living in the dataset) so that persistent workers, which
    hold their own copy of the dataset, still seed every sample's augmentation with the right epoch.
    """

    def __init__(self, split: FileSplit, transform: Callable[[Image.Image], Tensor], seed: int) -> None:
        self.split = split
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.split.paths)

    def __getitem__(self, request: tuple[int, int]) -> tuple[Tensor, int]:
        epoch, index = request
        with Image.open(self.split.paths[index]) as image:
            rgb = image.convert("RGB")
        # torchvision's random transforms draw from the global torch RNG: seed it per sample inside a fork so
        # the result depends on (seed, epoch, index) only, and the caller's RNG stream is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, epoch, index))
            pixels = self.transform(rgb)
        return pixels, self.split.labels[index]


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` requests for this rank's shard of one epoch.

    Training: a permutation seeded by ``(seed, epoch)``, truncated to a multiple of ``world_size`` and dealt
    round-robin, so every rank gets the same number of samples (DDP needs equal step counts). Evaluation: the
    split in order, dealt round-robin without padding, so every sample is scored exactly once across ranks.
    """

    def __init__(self, size: int, *, shuffle: bool, seed: int, rank: int, world_size: int) -> None:
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.rank, self.size, self.world_size))
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator)
        usable = self.size - self.size % self.world_size
        return order[:usable][self.rank::self.world_size].tolist()

    def __len__(self) -> int:
        if not self.shuffle:
            return len(range(self.rank, self.size, self.world_size))
        return self.size // self.world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, index) for index in self.shard())


class StreamingLoader:
    """``epoch(n)`` yields ``(images, labels)``: float normalised NCHW and int64, both on ``device``."""

    def __init__(self, split: FileSplit, *, batch_size: int, train: bool, image_size: int,
                 mean: Sequence[float], std: Sequence[float], device: torch.device, seed: int,
                 num_workers: int = 4, drop_last: bool | None = None, rank: int = 0, world_size: int = 1) -> None:
        if not split.paths:
            raise ValueError("the split has no images; re-run `python -m reproduce prepare`")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
        self.batch_size = batch_size
        self.device = device
        self.drop_last = train if drop_last is None else drop_last  # a ragged last step would skew BatchNorm
        self.sampler = EpochSampler(len(split.paths), shuffle=train, seed=seed, rank=rank, world_size=world_size)
        transform = train_transform(image_size) if train else eval_transform(image_size)
        self.loader = DataLoader(
            FileSplitDataset(split, transform, seed),
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            drop_last=self.drop_last,
            pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
            # The loader draws its workers' base seeds from this generator rather than the global RNG.
            generator=torch.Generator().manual_seed(seed),
        )
        # Normalise uint8 on the device: copying bytes is 4x cheaper than copying floats.
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255

    def __len__(self) -> int:
        samples = len(self.sampler)
        return samples // self.batch_size if self.drop_last else -(-samples // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        self.sampler.set_epoch(epoch)
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True).float()
            yield (images - self.mean) / self.std, labels.to(self.device, non_blocking=True)
