"""The device-resident loader: a whole epoch cropped, flipped and ordered in a few batched ops, normalised per
batch into the compute dtype and layout, deterministic per (seed, epoch), sharded for DDP."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chi2_contingency, chisquare
from torch.overrides import TorchFunctionMode

from reproduce.config import AugmentConfig, DatasetConfig
from reproduce.data.loader import (DeviceLoader, Normalise, crop_and_flip, draw_crops, epoch_generator,
                                   make_loaders)
from reproduce.data.prepare import Split, load_prepared
from reproduce.errors import ConfigError

CPU = torch.device("cpu")


def _split(n: int = 40, channels: int = 3, size: int = 6, classes: int = 5) -> Split:
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    return Split(images, torch.arange(n) % classes)


def _pixels(channels_last: bool = False) -> Normalise:
    """A normalisation that returns the pixel values themselves, so outputs can be compared with inputs."""
    return Normalise([0.0] * 3, [1 / 255] * 3, CPU, channels_last=channels_last)


def _loader(seed: int, split: Split | None = None, *, padding: int = 1, mode: str = "zeros", batch_size: int = 8,
            normalise: Normalise | None = None, **kwargs) -> DeviceLoader:
    return DeviceLoader(split or _split(), batch_size=batch_size, normalise=normalise or _pixels(), device=CPU,
                        seed=seed, train=True, augment=AugmentConfig(crop_padding=padding, flip=True, padding_mode=mode),
                        **kwargs)


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_crop_and_flip_is_pad_then_crop_then_mirror(mode: str) -> None:
    images = _split(n=30, size=7).images
    crops = draw_crops(30, AugmentConfig(crop_padding=3, padding_mode=mode), torch.Generator().manual_seed(0))
    index = torch.randperm(30, generator=torch.Generator().manual_seed(1))
    out = crop_and_flip(images, index, crops, 3, mode)
    padded = F.pad(images.float(), (3,) * 4, mode="reflect" if mode == "reflect" else "constant").to(torch.uint8)
    assert out.shape == (30, 3, 7, 7) and out.dtype == torch.uint8
    for i in range(30):
        window = padded[index[i], :, crops.top[i]:crops.top[i] + 7, crops.left[i]:crops.left[i] + 7]
        assert torch.equal(out[i], window.flip(2) if crops.flip[i] else window), i
    assert 0 < int(crops.flip.sum()) < 30 and len(set(zip(crops.top.tolist(), crops.left.tolist()))) > 10


def test_every_training_view_is_a_window_of_its_own_padded_image() -> None:
    split = _split(n=64, classes=64)  # label = image index
    images, labels = next(iter(_loader(0, split, padding=2, batch_size=64).epoch(3)))
    padded = F.pad(split.images, (2, 2, 2, 2))
    offsets = set()
    for view, label in zip(images.to(torch.uint8), labels):
        matches = [(dy, dx, flip) for dy in range(5) for dx in range(5) for flip in (False, True)
                   if torch.equal(view, padded[label, :, dy:dy + 6, dx:dx + 6].flip(2) if flip
                                  else padded[label, :, dy:dy + 6, dx:dx + 6])]
        assert matches, "every view must be a (possibly mirrored) 6x6 window of its own padded image"
        offsets.add(matches[0])
    assert len(offsets) > 20  # offsets and flips differ per image, not one per batch


def _per_batch_draws(seed: int, epoch: int, n: int, batch: int, padding: int) -> tuple[list[int], list[int], list[bool]]:
    """The draws of the per-batch loader this one replaced: each global batch drew its tops, lefts and flips."""
    generator = epoch_generator(seed, epoch, CPU)
    torch.randperm(n, generator=generator)
    tops, lefts, flips = [], [], []
    for _ in range(n // batch):
        tops += torch.randint(0, 2 * padding + 1, (batch,), generator=generator).tolist()
        lefts += torch.randint(0, 2 * padding + 1, (batch,), generator=generator).tolist()
        flips += (torch.rand(batch, generator=generator) < 0.5).tolist()
    return tops, lefts, flips


def test_crops_and_flips_have_the_per_batch_loaders_distribution() -> None:
    n, padding = 20_000, 4
    crops = draw_crops(n, AugmentConfig(crop_padding=padding), epoch_generator(0, 1, CPU))
    tops, lefts, flips = _per_batch_draws(100, 1, n, 64, padding)  # another seed: an independent sample
    new_cells = Counter(zip(crops.top.tolist(), crops.left.tolist(), crops.flip.tolist()))
    old_cells = Counter(zip(tops, lefts, flips))
    cells = sorted(set(new_cells) | set(old_cells))
    assert len(cells) == 9 * 9 * 2  # every offset pair, mirrored and not
    # Two samples of one distribution (fixed seeds: the p-values are fixed numbers, the test cannot flake; a
    # shifted range or a dependence between the draws gives p < 1e-10 at this size).
    assert chi2_contingency([[new_cells[c] for c in cells], [old_cells[c] for c in cells]]).pvalue > 0.001
    # ... and that distribution is uniform and independent over (top, left, flip).
    assert chisquare([new_cells[c] for c in cells]).pvalue > 0.001
    assert abs(float(crops.flip.float().mean()) - 0.5) < 0.01


def test_no_padding_draws_no_offsets_and_flip_off_draws_no_flips() -> None:
    crops = draw_crops(50, AugmentConfig(crop_padding=0, flip=False), torch.Generator().manual_seed(0))
    assert not crops.top.any() and not crops.left.any() and not crops.flip.any()
    split = _split()
    loader = DeviceLoader(split, batch_size=8, normalise=_pixels(), device=CPU, seed=0, train=True,
                          augment=AugmentConfig(crop_padding=0, flip=False))
    images, labels = next(iter(loader.epoch(0)))
    order = torch.randperm(40, generator=epoch_generator(0, 0, CPU))[:8]
    assert torch.equal(images.to(torch.uint8), split.images[order]) and torch.equal(labels, split.labels[order])


def test_normalise_standardises_per_channel_into_the_compute_dtype_and_layout() -> None:
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = Normalise([0.5, 0.25, 0.0], [0.5, 0.25, 1.0], CPU, channels_last=False)(x)
    assert out.dtype == torch.float32 and torch.allclose(out[0, :, 0, 0], torch.tensor([1.0, 3.0, 1.0]))
    half = Normalise([0.5, 0.25, 0.0], [0.5, 0.25, 1.0], CPU, channels_last=True, dtype=torch.bfloat16)(x)
    assert half.dtype == torch.bfloat16 and half.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(half, out.to(torch.bfloat16))  # float32 arithmetic, one rounding at the end


def test_epoch_batches_are_a_pure_function_of_seed_and_epoch() -> None:
    first = [(x.clone(), y.clone()) for x, y in _loader(3).epoch(2)]
    loader = _loader(3)
    list(loader.epoch(5))  # another epoch in between (a resumed run starts anywhere)
    again = list(loader.epoch(2))
    other_epoch = [y for _, y in _loader(3).epoch(3)]
    assert len(first) == 5 and all(x.shape == (8, 3, 6, 6) for x, _ in first)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not all(torch.equal(a[1], b) for a, b in zip(first, other_epoch))


def test_training_epoch_visits_each_image_once_and_ranks_see_disjoint_shards() -> None:
    unique = _split(classes=40)  # label = image index
    labels_seen = torch.cat([y for _, y in _loader(0, unique).epoch(1)])
    assert sorted(labels_seen.tolist()) == list(range(40))
    shards = [torch.cat([y for _, y in _loader(0, unique, rank=r, world_size=2).epoch(1)]) for r in range(2)]
    assert [len(s) for s in shards] == [16, 16]
    assert not set(shards[0].tolist()) & set(shards[1].tolist())


@pytest.mark.parametrize("world", [2, 3])
def test_the_ranks_kth_batches_are_the_one_process_global_batch_with_its_augmentation(world: int) -> None:
    split = _split(n=100, classes=100)
    whole = list(_loader(4, split, padding=2, mode="reflect", batch_size=world * 8).epoch(6))
    shards = [list(_loader(4, split, padding=2, mode="reflect", rank=rank, world_size=world).epoch(6))
              for rank in range(world)]
    assert all(len(shard) == len(whole) for shard in shards)
    order = torch.cat([torch.arange(rank, world * 8, world) for rank in range(world)])
    for k, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([shard[k][0] for shard in shards]), x[order])
        assert torch.equal(torch.cat([shard[k][1] for shard in shards]), y[order])


def test_a_batch_larger_than_the_split_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"recipe\.batch_size: the training split has 40 images, fewer than one "
                                          r"batch of 32 per process"):
        _loader(0, batch_size=32, world_size=2)


def test_evaluation_loader_keeps_order_and_the_last_partial_batch() -> None:
    split = _split(n=21)
    loader = DeviceLoader(split, batch_size=8, normalise=_pixels(), device=CPU)
    batches = list(loader.epoch(0))
    assert len(loader) == len(batches) == 3 and [len(y) for _, y in batches] == [8, 8, 5]
    assert torch.equal(torch.cat([y for _, y in batches]), split.labels)
    assert torch.equal(torch.cat([x for x, _ in batches]).to(torch.uint8), split.images)


class _CountCalls(TorchFunctionMode):
    """Counts torch calls other than indexing and sizes: on a GPU each one is (at least) a kernel launch."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") not in ("__getitem__", "__len__", "__get__")
        return func(*args, **(kwargs or {}))


def _calls(images: int, batches: int) -> tuple[int, int]:
    """(calls until the first batch, calls per batch after it) of a training epoch."""
    loader = _loader(0, _split(n=images), padding=4, batch_size=8, normalise=_pixels(channels_last=True))
    with _CountCalls() as calls:
        epoch = loader.epoch(1)
        next(epoch)
        setup = calls.count
        for _ in range(batches):
            next(epoch)
    return setup, (calls.count - setup) // batches


def test_an_epoch_is_a_few_batched_calls_then_three_per_batch() -> None:
    # The per-batch loader this replaced made ~20 kernels per batch (pad, 2 randint, 4 arange, 2 gathers, flip...).
    setup, per_batch = _calls(400, 10)
    assert per_batch == 3  # (x - mean) / std into the compute dtype; the images are sliced from the epoch
    assert _calls(800, 10) == (setup, per_batch)  # the epoch's draws and gather do not grow with its length
    assert setup < 40


def test_make_loaders_emits_the_compute_dtype_in_channels_last(prepared_root: Path) -> None:
    prepared = load_prepared(prepared_root / "digits")
    options = dict(batch_size=32, eval_batch_size=100, device=CPU, seed=0, num_workers=0)
    dataset = DatasetConfig(augment=AugmentConfig(crop_padding=1, flip=False))
    train, evaluation = make_loaders(prepared, dataset, channels_last=True, dtype=torch.bfloat16, **options)
    reference, reference_eval = make_loaders(prepared, dataset, channels_last=False, **options)
    for (x, y), (x_ref, y_ref) in zip(train.epoch(2), reference.epoch(2), strict=True):
        assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
        assert x_ref.dtype == torch.float32 and torch.equal(y, y_ref)
        assert torch.equal(x, x_ref.to(torch.bfloat16))
    assert set(evaluation) == {"val", "test"}
    x, _ = next(iter(evaluation["test"].epoch(0)))
    assert torch.equal(x, next(iter(reference_eval["test"].epoch(0)))[0].to(torch.bfloat16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_cuda_epoch_is_made_on_the_gpu_in_bf16_channels_last(mode: str) -> None:
    cuda = torch.device("cuda")
    split = _split(n=64, classes=64)  # label = image index
    normalise = Normalise([0.0] * 3, [1 / 255] * 3, cuda, channels_last=True, dtype=torch.bfloat16)
    loader = DeviceLoader(split, batch_size=16, normalise=normalise, device=cuda, seed=0, train=True,
                          augment=AugmentConfig(crop_padding=2, flip=True, padding_mode=mode))
    batches = list(loader.epoch(1))
    assert all(x.is_cuda and x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
               for x, _ in batches)
    labels = torch.cat([y for _, y in batches]).cpu()
    assert sorted(labels.tolist()) == list(range(64))
    padded = F.pad(split.images.float(), (2,) * 4, mode="reflect" if mode == "reflect" else "constant")
    for x, y in batches:  # uint8 values survive bf16 exactly: every view is a window of its padded image
        for view, label in zip(x.float().cpu(), y.cpu()):
            assert any(torch.equal(view, window) or torch.equal(view, window.flip(2))
                       for window in (padded[label, :, dy:dy + 6, dx:dx + 6] for dy in range(5) for dx in range(5)))
