"""Batches for training and evaluation.

The prepared uint8 images live on the training device; shuffling, random crop with padding,
horizontal flip and normalisation run batched there (airbench's recipe: no CPU DataLoader in the
hot loop, which is what starves small CIFAR models on a GPU). Every random draw comes from a
generator seeded by ``(seed, epoch)``, so an epoch's batches are a pure function of the epoch and an
exact resume needs no saved loader state. ImageNet-scale ("files" storage) data streams through
``StreamingLoader`` instead; both expose ``len()`` and ``epoch(n)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from reproduce.config import AugmentConfig, DatasetConfig
from reproduce.data.prepare import Prepared, Split


class Batches(Protocol):
    def __len__(self) -> int: ...
    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]: ...


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + epoch)
    return generator


# Per-channel statistics the official codes hard-code (SOKD's loader normalises CIFAR-100 with CIFAR-10's).
NORMALISATION_STATS: dict[str, tuple[list[float], list[float]]] = {
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
    "cifar100": ([0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]),
    "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}
NORMALISATIONS = ("dataset", *NORMALISATION_STATS)  # dataset: the prepared training split's own statistics
PADDING_MODES = ("zeros", "reflect")


def random_crop(images: Tensor, padding: int, generator: torch.Generator, mode: str = "zeros") -> Tensor:
    """Pad each image by ``padding`` (zeros, or reflect as SOKD's loader does) and crop back to its size
    at a random offset, batched."""
    if padding <= 0:
        return images
    batch, channels, height, width = images.shape
    if mode == "reflect":  # F.pad's reflect needs floats; uint8 values survive the round trip exactly
        padded = F.pad(images.float(), (padding,) * 4, mode="reflect").to(images.dtype)
    else:
        padded = F.pad(images, (padding, padding, padding, padding))
    device = images.device
    top = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    left = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    rows = (top[:, None] + torch.arange(height, device=device))[:, None, :, None]
    cols = (left[:, None] + torch.arange(width, device=device))[:, None, None, :]
    return padded[torch.arange(batch, device=device)[:, None, None, None],
                  torch.arange(channels, device=device)[None, :, None, None], rows, cols]


def random_flip(images: Tensor, generator: torch.Generator) -> Tensor:
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


class Normalise:
    """uint8 NCHW -> float, standardised per channel, in the memory format the models expect."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device, channels_last: bool) -> None:
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: Tensor) -> Tensor:
        return ((images.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)


class DeviceLoader:
    """A split resident on ``device``; ``epoch(n)`` yields normalised ``(x, y)`` batches."""

    def __init__(self, split: Split, *, batch_size: int, normalise: Normalise, device: torch.device,
                 seed: int = 0, train: bool = False, augment: AugmentConfig | None = None,
                 rank: int = 0, world_size: int = 1) -> None:
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size = batch_size
        self.normalise = normalise
        self.device = device
        self.seed = seed
        self.train = train  # shuffle, augment and drop the last partial batch
        self.augment = augment if train else None
        self.rank, self.world_size = rank, world_size
        if train and len(self.labels) // world_size < batch_size:
            raise ValueError(f"the training split has {len(self.labels)} images, fewer than one batch of "
                             f"{batch_size} per process; lower recipe.batch_size")

    def __len__(self) -> int:
        per_rank = len(self.labels) // self.world_size if self.train else len(self.labels)
        return per_rank // self.batch_size if self.train else -(-per_rank // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        if self.train:
            generator = epoch_generator(self.seed, epoch, self.device)
            order = torch.randperm(len(self.labels), generator=generator, device=self.device)
        else:
            generator, order = None, torch.arange(len(self.labels), device=self.device)
        # Under DDP every rank cuts the same permutation into global batches of world_size x batch_size and
        # keeps every world_size-th image of each, from its rank: disjoint shards whose k-th batches together
        # are the one-process k-th batch of the global size. The global batch is augmented before it is
        # split, so the crops and flips are the one-process run's too (and no two ranks share their draws).
        size = self.batch_size * (self.world_size if self.train else 1)
        for start in range(0, len(self) * size, size):
            index = order[start:start + size]
            images = self.images[index]
            if self.augment is not None:
                images = random_crop(images, self.augment.crop_padding, generator, self.augment.padding_mode)
                if self.augment.flip:
                    images = random_flip(images, generator)
            if self.train and self.world_size > 1:
                images, index = images[self.rank::self.world_size], index[self.rank::self.world_size]
            yield self.normalise(images), self.labels[index]


def make_loaders(prepared: Prepared, dataset: DatasetConfig, *, batch_size: int, eval_batch_size: int,
                 device: torch.device, seed: int, channels_last: bool, num_workers: int,
                 rank: int = 0, world_size: int = 1) -> tuple[Batches, dict[str, Batches]]:
    """The training batches and the evaluation batches by split name: "val" (absent when the prepared
    data has no validation split, ``dataset.val_fraction: 0``) and "test"."""
    mean, std = NORMALISATION_STATS.get(dataset.normalization, (prepared.manifest["mean"], prepared.manifest["std"]))
    evaluated = [(name, split) for name, split in (("val", prepared.val), ("test", prepared.test)) if len(split.labels)]
    if prepared.storage == "files":
        from reproduce.data.streaming import StreamingLoader

        def stream(split, train: bool, size: int) -> StreamingLoader:
            return StreamingLoader(split, batch_size=size, train=train, image_size=dataset.image_size,
                                   mean=mean, std=std, device=device, seed=seed, num_workers=num_workers,
                                   rank=rank if train else 0, world_size=world_size if train else 1)

        return (stream(prepared.train, True, batch_size),
                {name: stream(split, False, eval_batch_size) for name, split in evaluated})
    normalise = Normalise(mean, std, device, channels_last)
    train = DeviceLoader(prepared.train, batch_size=batch_size, normalise=normalise, device=device, seed=seed,
                         train=True, augment=dataset.augment, rank=rank, world_size=world_size)
    evaluation = {name: DeviceLoader(split, batch_size=eval_batch_size, normalise=normalise, device=device)
                  for name, split in evaluated}
    return train, evaluation
