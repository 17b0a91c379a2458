"""The device-resident loader: batched crop/flip/normalise, deterministic per (seed, epoch)."""

from __future__ import annotations

import torch

from reproduce.config import AugmentConfig
from reproduce.data.loader import DeviceLoader, Normalise, random_crop, random_flip
from reproduce.data.prepare import Split


def _split(n: int = 40, channels: int = 3, size: int = 6, classes: int = 5) -> Split:
    images = torch.arange(n * channels * size * size, dtype=torch.int64).remainder(251).to(torch.uint8)
    return Split(images.view(n, channels, size, size), torch.arange(n) % classes)


def test_random_crop_is_a_window_of_the_zero_padded_image() -> None:
    images = _split().images
    generator = torch.Generator().manual_seed(0)
    cropped = random_crop(images, 2, generator)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    assert cropped.shape == images.shape and cropped.dtype == torch.uint8
    offsets_seen = set()
    for original, crop in zip(padded, cropped):
        matches = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(original[:, dy:dy + 6, dx:dx + 6], crop)]
        assert matches, "every crop must be a 6x6 window of its own padded image"
        offsets_seen.add(matches[0])
    assert len(offsets_seen) > 5  # offsets differ per image: the crop is batched, not one offset per batch


def test_random_flip_mirrors_about_half_the_images() -> None:
    images = _split(n=400).images
    flipped = random_flip(images, torch.Generator().manual_seed(1))
    mirrored = [torch.equal(f, i.flip(2)) and not torch.equal(f, i) for f, i in zip(flipped, images)]
    unchanged = [torch.equal(f, i) for f, i in zip(flipped, images)]
    assert all(m or u for m, u in zip(mirrored, unchanged))
    assert 150 < sum(mirrored) < 250


def test_normalise_standardises_per_channel() -> None:
    normalise = Normalise([0.5, 0.25, 0.0], [0.5, 0.25, 1.0], torch.device("cpu"), channels_last=False)
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalise(x)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([1.0, 3.0, 1.0]))


def _loader(seed: int, split: Split | None = None, **kwargs) -> DeviceLoader:
    normalise = Normalise([0.5] * 3, [0.5] * 3, torch.device("cpu"), channels_last=False)
    return DeviceLoader(split or _split(), batch_size=8, normalise=normalise, device=torch.device("cpu"), seed=seed,
                        train=True, augment=AugmentConfig(crop_padding=1, flip=True), **kwargs)


def test_epoch_batches_are_a_pure_function_of_seed_and_epoch() -> None:
    first = [(x.clone(), y.clone()) for x, y in _loader(3).epoch(2)]
    again = [(x.clone(), y.clone()) for x, y in _loader(3).epoch(2)]
    other_epoch = [y for _, y in _loader(3).epoch(3)]
    assert len(first) == 5 and all(x.shape == (8, 3, 6, 6) for x, _ in first)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not all(torch.equal(a[1], b) for a, b in zip(first, other_epoch))


def test_training_epoch_visits_each_image_once_and_ranks_see_disjoint_shards() -> None:
    labels_seen = torch.cat([y for _, y in _loader(0).epoch(1)])
    assert len(labels_seen) == 40 and torch.equal(labels_seen.sort().values, (torch.arange(40) % 5).sort().values)
    unique = _split(classes=40)  # label = image index
    shards = [torch.cat([y for _, y in _loader(0, unique, rank=r, world_size=2).epoch(1)]) for r in range(2)]
    assert [len(s) for s in shards] == [16, 16]
    assert not set(shards[0].tolist()) & set(shards[1].tolist())


def test_evaluation_loader_keeps_order_and_the_last_partial_batch() -> None:
    normalise = Normalise([0.0] * 3, [1.0] * 3, torch.device("cpu"), channels_last=False)
    loader = DeviceLoader(_split(n=21), batch_size=8, normalise=normalise, device=torch.device("cpu"))
    labels = torch.cat([y for _, y in loader.epoch(0)])
    assert len(loader) == 3 and torch.equal(labels, torch.arange(21) % 5)
