"""Batches for training and evaluation.

The prepared uint8 images live on the training device, and a training epoch is made there in a few batched
ops (airbench's recipe: no CPU DataLoader in the hot loop, which is what starves small CIFAR models on a GPU):
one permutation, the crop offsets and flips of every image drawn at once (``draw_crops``), one pad and one
gather that crop, flip and order the whole epoch in uint8 (``crop_and_flip``); per batch, only the
normalisation into the compute dtype and memory format (``Normalise``). Every draw comes from a generator
seeded by ``(seed, epoch)``, so an epoch's batches are a pure function of the epoch and an exact resume needs
no saved loader state. ImageNet-scale ("files" storage) data streams through ``StreamingLoader`` instead;
both expose ``len()`` and ``epoch(n)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from reproduce.config import AugmentConfig, DatasetConfig
from reproduce.data.prepare import Prepared, Split
from reproduce.errors import ConfigError


class Batches(Protocol):
    def __len__(self) -> int: ...
    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]: ...


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + epoch)
    return generator


# Per-channel statistics the official codes hard-code (SOKD's loader normalises CIFAR-100 with CIFAR-10's);
# dataset.normalization "dataset" uses the prepared training split's own statistics instead.
NORMALISATION_STATS: dict[str, tuple[list[float], list[float]]] = {
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
    "cifar100": ([0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]),
    "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}


@dataclass(frozen=True)
class Crops:
    """One random crop and flip per image: the window's offset in the padded image (0..2*padding) and whether
    it is mirrored. Each image draws its own, independently and uniformly (torchvision's RandomCrop with
    ``padding`` followed by RandomHorizontalFlip)."""

    top: Tensor  # int64 [N]
    left: Tensor  # int64 [N]
    flip: Tensor  # bool [N]

    def __getitem__(self, index: Tensor) -> Crops:
        return Crops(self.top[index], self.left[index], self.flip[index])


def draw_crops(count: int, augment: AugmentConfig, generator: torch.Generator) -> Crops:
    """``count`` crops and flips drawn at once; no padding draws no offsets, ``flip: false`` no flips."""
    device = generator.device
    span = 2 * augment.crop_padding + 1
    if augment.crop_padding > 0:
        top = torch.randint(0, span, (count,), generator=generator, device=device)
        left = torch.randint(0, span, (count,), generator=generator, device=device)
    else:
        top = left = torch.zeros(count, dtype=torch.int64, device=device)
    flip = (torch.rand(count, generator=generator, device=device) < 0.5 if augment.flip
            else torch.zeros(count, dtype=torch.bool, device=device))
    return Crops(top, left, flip)


def crop_and_flip(images: Tensor, index: Tensor, crops: Crops, padding: int, mode: str = "zeros") -> Tensor:
    """``images[index]``, each padded by ``padding`` (zeros, or reflect as SOKD's loader does), cropped back to
    its size at its offset and mirrored where its flip says: one pad, one gather of the windows (a strided
    view of every offset, so each image is read as whole rows) and one select of the mirrored ones."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (padding,) * 4, mode="constant" if mode == "zeros" else mode) if padding else images
    windows = padded.unfold(2, height, 1).unfold(3, width, 1)  # [N, C, 2p+1, 2p+1, H, W], no copy
    out = windows[index, :, crops.top, crops.left]
    return torch.where(crops.flip[:, None, None, None], out.flip(3), out)


class Normalise:
    """uint8 NCHW -> standardised per channel, in the compute dtype and the memory format the models expect.

    The arithmetic is float32 whatever ``dtype`` is (one rounding into bf16 at the end, not one per op)."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device, channels_last: bool,
                 dtype: torch.dtype | None = None) -> None:
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.dtype = dtype or torch.float32
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: Tensor) -> Tensor:
        # uint8 - float32 promotes to float32 in the subtraction itself: no separate conversion pass.
        return ((images - self.mean) / self.std).to(self.dtype, memory_format=self.memory_format)


class DeviceLoader:
    """A split resident on ``device``; ``epoch(n)`` yields normalised ``(x, y)`` batches."""

    def __init__(self, split: Split, *, batch_size: int, normalise: Normalise, device: torch.device,
                 seed: int = 0, train: bool = False, augment: AugmentConfig | None = None,
                 rank: int = 0, world_size: int = 1) -> None:
        # Stored in the models' memory format, so that slices and the epoch's gather come out in it too.
        self.images = split.images.to(device).contiguous(memory_format=normalise.memory_format)
        self.labels = split.labels.to(device)
        self.batch_size = batch_size
        self.normalise = normalise
        self.device = device
        self.seed = seed
        self.train = train  # shuffle, augment and drop the last partial batch
        self.augment = augment if train else None
        self.rank, self.world_size = rank, world_size
        if train and len(self.labels) // world_size < batch_size:
            raise ConfigError(f"recipe.batch_size: the training split has {len(self.labels)} images, fewer than "
                              f"one batch of {batch_size} per process; lower recipe.batch_size")

    def __len__(self) -> int:
        per_rank = len(self.labels) // self.world_size if self.train else len(self.labels)
        return per_rank // self.batch_size if self.train else -(-per_rank // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        # Evaluation: the split in order, the last partial batch kept. Training: the epoch made at once.
        images, labels = self.training_epoch(epoch) if self.train else (self.images, self.labels)
        for start in range(0, len(labels), self.batch_size):
            yield self.normalise(images[start:start + self.batch_size]), labels[start:start + self.batch_size]

    def training_epoch(self, epoch: int) -> tuple[Tensor, Tensor]:
        """This rank's images of epoch ``epoch``, augmented, in uint8, batch after batch, and their labels.

        The permutation and every image's crop and flip are drawn for the whole split in one go, from
        ``(seed, epoch)`` alone. Under DDP every rank cuts the same permutation into global batches of
        world_size x batch_size and keeps every world_size-th position of each, from its rank: disjoint shards
        whose k-th batches together are the one-process k-th batch of the global size, with the one-process
        run's crops and flips (the draws belong to the positions, whoever takes them)."""
        generator = epoch_generator(self.seed, epoch, self.device)
        order = torch.randperm(len(self.labels), generator=generator, device=self.device)
        crops = draw_crops(len(order), self.augment, generator) if self.augment is not None else None
        steps, world = len(self), self.world_size
        positions = torch.arange(steps * self.batch_size * world, device=self.device)
        positions = positions.view(steps, self.batch_size, world)[:, :, self.rank].reshape(-1)
        index = order[positions]
        if crops is None:
            images = self.images[index]
        else:
            images = crop_and_flip(self.images, index, crops[positions], self.augment.crop_padding,
                                   self.augment.padding_mode)
        return images.contiguous(memory_format=self.normalise.memory_format), self.labels[index]


def make_loaders(prepared: Prepared, dataset: DatasetConfig, *, batch_size: int, eval_batch_size: int,
                 device: torch.device, seed: int, channels_last: bool, num_workers: int,
                 rank: int = 0, world_size: int = 1, dtype: torch.dtype | None = None,
                 ) -> tuple[Batches, dict[str, Batches]]:
    """The training batches and the evaluation batches by split name: "val" (absent when the prepared
    data has no validation split, ``dataset.val_fraction: 0``) and "test". Batches come in ``dtype``
    (None: float32) and, with ``channels_last``, in that memory format."""
    mean, std = NORMALISATION_STATS.get(dataset.normalization, (prepared.manifest["mean"], prepared.manifest["std"]))
    normalise = Normalise(mean, std, device, channels_last, dtype)
    evaluated = [(name, split) for name, split in (("val", prepared.val), ("test", prepared.test)) if len(split.labels)]
    if prepared.storage == "files":
        from reproduce.data.streaming import streaming_loaders

        return streaming_loaders(prepared, evaluated, dataset, normalise=normalise, batch_size=batch_size,
                                 eval_batch_size=eval_batch_size, device=device, seed=seed,
                                 num_workers=num_workers, rank=rank, world_size=world_size)
    train = DeviceLoader(prepared.train, batch_size=batch_size, normalise=normalise, device=device, seed=seed,
                         train=True, augment=dataset.augment, rank=rank, world_size=world_size)
    evaluation = {name: DeviceLoader(split, batch_size=eval_batch_size, normalise=normalise, device=device)
                  for name, split in evaluated}
    return train, evaluation
