"""Loaders of "files" storage (ImageNet-scale) on the ImageFolder fixture: streamed training views (decoded by
workers with PIL, or batched on a device with decode_jpeg) and the evaluation views decoded once into a cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reproduce.config import DatasetConfig
from reproduce.data import eval_cache
from reproduce.data.eval_cache import CachedEvalLoader, cache_path
from reproduce.data.loader import Normalise, make_loaders
from reproduce.data.prepare import IMAGENET_MEAN, IMAGENET_STD, Prepared, load_prepared, prepare
from reproduce.data.streaming import (DecodedImages, EpochSampler, StreamingLoader, apply_view, decode_batch,
                                      draw_view)
from reproduce.errors import ConfigError
from tests.data_fixtures import write_imagenet

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec, which is not a dependency here.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

CPU = torch.device("cpu")
PIXELS = Normalise([0.0] * 3, [1 / 255] * 3, CPU, channels_last=False)  # returns the uint8 values as floats


def _prepare(tmp_path: Path, split_seed: int = 0) -> Prepared:
    directory = prepare("imagenet", tmp_path / "raw", tmp_path / "prepared", val_fraction=0.2, split_seed=split_seed,
                        progress=False)
    return load_prepared(directory)


@pytest.fixture
def imagenet(tmp_path: Path) -> Prepared:
    write_imagenet(tmp_path / "raw", n_classes=3, per_class=10, val_per_class=3)
    return _prepare(tmp_path)


def streaming(prepared: Prepared, *, seed: int = 0, normalise: Normalise = PIXELS, **options) -> StreamingLoader:
    return StreamingLoader(prepared.train, batch_size=4, image_size=32, normalise=normalise, device=CPU, seed=seed,
                           **options)


def collect(loader, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader.epoch(epoch))
    assert len(batches) == len(loader)
    return torch.cat([images for images, _ in batches]), torch.cat([labels for _, labels in batches])


# ----------------------------------------------------------------------------------------------
# Training views


def test_training_batches_are_shaped_normalised_and_reproducible(imagenet: Prepared) -> None:
    normalise = Normalise(IMAGENET_MEAN, IMAGENET_STD, CPU, channels_last=True, dtype=torch.bfloat16)
    loader = streaming(imagenet, normalise=normalise)
    assert len(loader) == 24 // 4  # 3 classes x 8 images after the validation carve-out
    for images, labels in loader.epoch(0):
        assert images.shape == (4, 3, 32, 32) and images.dtype == torch.bfloat16
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.shape == (4,) and labels.dtype == torch.int64
        assert -3 < images.float().mean() < 3 and images.min() < 0 < images.max()

    first_images, first_labels = collect(loader, 1)
    fresh_images, fresh_labels = collect(streaming(imagenet, normalise=normalise), 1)
    assert torch.equal(first_images, fresh_images) and torch.equal(first_labels, fresh_labels)
    again_images, _ = collect(loader, 1)
    assert torch.equal(first_images, again_images)
    next_images, next_labels = collect(loader, 2)
    assert not torch.equal(first_labels, next_labels) and not torch.equal(first_images, next_images)
    assert sorted(next_labels.tolist()) == sorted(imagenet.train.labels)  # each image once per epoch


def test_a_view_is_a_function_of_seed_epoch_and_index(imagenet: Prepared) -> None:
    dataset = DecodedImages(imagenet.train, 32, seed=0)
    view, label = dataset[(1, 0)]
    assert view.shape == (32, 32, 3) and view.dtype == torch.uint8 and label == imagenet.train.labels[0]
    torch.manual_seed(123)  # the global RNG must not matter
    assert torch.equal(dataset[(1, 0)][0], view)
    assert not torch.equal(dataset[(2, 0)][0], view)
    assert not torch.equal(DecodedImages(imagenet.train, 32, seed=1)[(1, 0)][0], view)
    state = torch.get_rng_state()
    dataset[(3, 0)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG stream is untouched


def test_views_follow_random_resized_crop_and_flip(imagenet: Prepared) -> None:
    with Image.open(imagenet.train.paths[0]) as image:
        rgb = image.convert("RGB")
    views = [draw_view(rgb, 0, epoch, 0) for epoch in range(200)]
    for view in views:
        area = view.height * view.width / (rgb.width * rgb.height)
        assert 0 <= view.top <= rgb.height - view.height and 0 <= view.left <= rgb.width - view.width
        assert 0.08 - 1e-9 <= area <= 1 + 1e-9
    assert 70 < sum(view.flip for view in views) < 130
    mirrored = views[next(i for i, view in enumerate(views) if view.flip)]
    unmirrored = type(mirrored)(mirrored.top, mirrored.left, mirrored.height, mirrored.width, False)
    assert apply_view(rgb, mirrored, 16) == apply_view(rgb, unmirrored, 16).transpose(Image.FLIP_LEFT_RIGHT)


def test_device_decoding_gives_the_workers_views(imagenet: Prepared) -> None:
    """The dataset.gpu_decode path (decode_jpeg of the whole batch), run on the CPU: the same samples in the same
    order with the same crop boxes and flips; only the decoder and the resize differ, by at most one level."""
    on_device = collect(streaming(imagenet, decode_device=CPU), 1)
    in_workers = collect(streaming(imagenet), 1)
    assert torch.equal(on_device[1], in_workers[1])
    difference = (on_device[0] - in_workers[0]).abs()
    assert difference.max() <= 2 and difference.mean() < 0.5


def test_device_decoding_falls_back_for_files_that_are_not_jpeg(imagenet: Prepared, tmp_path: Path) -> None:
    png = tmp_path / "disguised.JPEG"  # ImageNet's train set holds a PNG named .JPEG
    Image.fromarray(np.full((20, 30, 3), 7, dtype=np.uint8)).save(png, format="PNG")
    paths = [imagenet.train.paths[0], str(png)]
    data = [torch.from_numpy(np.fromfile(path, dtype=np.uint8)) for path in paths]
    decoded = decode_batch(data, CPU, paths)
    assert decoded[1].shape == (3, 20, 30) and bool((decoded[1] == 7).all())
    assert decoded[0].shape[0] == 3
    (tmp_path / "broken.JPEG").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(ValueError, match=r"broken\.JPEG could not be decoded"):
        decode_batch([data[0], torch.frombuffer(bytearray(b"\xff\xd8 not really"), dtype=torch.uint8)], CPU,
                     [paths[0], str(tmp_path / "broken.JPEG")])


def test_epoch_sampler_shards_ranks_disjointly() -> None:
    shards = [EpochSampler(10, seed=5, rank=rank, world_size=3) for rank in range(3)]
    for sampler in shards:
        sampler.set_epoch(2)
    indices = [sampler.shard() for sampler in shards]
    assert [len(shard) for shard in indices] == [3, 3, 3] == [len(sampler) for sampler in shards]
    flat = [index for shard in indices for index in shard]
    assert len(set(flat)) == 9 and set(flat) <= set(range(10))
    assert list(shards[0]) == [(2, index) for index in indices[0]]


@pytest.mark.slow  # worker processes
@pytest.mark.parametrize("decode_on_device", [False, True])
def test_workers_give_the_in_process_batches(imagenet: Prepared, decode_on_device: bool) -> None:
    options = {"decode_device": CPU} if decode_on_device else {}
    in_process = collect(streaming(imagenet, **options), 3)
    with_workers = collect(streaming(imagenet, num_workers=2, **options), 3)
    assert torch.equal(in_process[0], with_workers[0]) and torch.equal(in_process[1], with_workers[1])


# ----------------------------------------------------------------------------------------------
# Evaluation views, decoded once


def _expected_eval_view(path: str) -> torch.Tensor:
    """The standard eval view, spelled out: shorter side to int(32 / 0.875) = 36, then the central 32x32."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    width, height = rgb.size
    scale = 36 / min(width, height)
    resized = rgb.resize((36, int(height * scale)) if width < height else (int(width * scale), 36), Image.BILINEAR)
    left, top = round((resized.width - 32) / 2), round((resized.height - 32) / 2)
    return torch.from_numpy(np.array(resized.crop((left, top, left + 32, top + 32)))).permute(2, 0, 1).float()


def _eval_loader(prepared: Prepared, part: str = "test", image_size: int = 32, **options) -> CachedEvalLoader:
    return CachedEvalLoader(prepared, part, getattr(prepared, part), image_size=image_size, batch_size=4,
                            normalise=options.pop("normalise", PIXELS), device=CPU, num_workers=0, **options)


def test_evaluation_views_are_ordered_and_exact(imagenet: Prepared) -> None:
    loader = _eval_loader(imagenet)
    assert len(loader) == 3  # 9 images, the last batch kept
    images, labels = collect(loader, 0)
    assert labels.tolist() == imagenet.test.labels
    for position, path in enumerate(imagenet.test.paths):
        assert torch.equal(images[position], _expected_eval_view(path))
    normalised, _ = next(iter(_eval_loader(imagenet, normalise=Normalise(IMAGENET_MEAN, IMAGENET_STD, CPU, True)).epoch(0)))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(normalised, (images[:4] / 255 - mean) / std)
    assert normalised.is_contiguous(memory_format=torch.channels_last)


def test_evaluation_views_are_decoded_once_and_reused(imagenet: Prepared, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    first = collect(_eval_loader(imagenet), 0)
    cache = cache_path(imagenet, "test", 32)
    # Beside the prepared folder (a DVC output), never inside it.
    assert cache.parent == tmp_path / "prepared" / "imagenet-decoded" and cache.is_file()
    assert sorted(path.name for path in imagenet.directory.iterdir()) == sorted(
        ["manifest.json", "train.json", "val.json", "test.json"])
    assert np.load(cache, mmap_mode="r").shape == (9, 32, 32, 3)

    def no_decoding(self, index):
        raise AssertionError("the cached views were decoded again")

    monkeypatch.setattr(eval_cache.EvalImages, "__getitem__", no_decoding)
    again = collect(_eval_loader(load_prepared(imagenet.directory)), 0)  # a later run
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    with pytest.raises(AssertionError, match="decoded again"):
        _eval_loader(imagenet, image_size=16)  # another size is another cache


def test_a_reprepared_dataset_gets_a_new_cache_and_a_damaged_one_is_rebuilt(imagenet: Prepared, tmp_path: Path) -> None:
    _eval_loader(imagenet, part="val")
    old = cache_path(imagenet, "val", 32)
    reprepared = _prepare(tmp_path, split_seed=1)  # another validation carve-out: another index
    new = cache_path(reprepared, "val", 32)
    assert new != old
    images, labels = collect(_eval_loader(reprepared, part="val"), 0)
    assert new.is_file() and not old.exists()  # the stale cache of the same split and size is removed
    assert labels.tolist() == reprepared.val.labels
    assert torch.equal(images[0], _expected_eval_view(reprepared.val.paths[0]))
    new.write_bytes(b"not a numpy file")
    assert torch.equal(collect(_eval_loader(reprepared, part="val"), 0)[0], images)
    assert not list(new.parent.glob(".*.partial"))


def test_make_loaders_streams_training_and_caches_evaluation(imagenet: Prepared) -> None:
    dataset = DatasetConfig(name="imagenet", image_size=32)
    options = dict(batch_size=4, eval_batch_size=5, device=CPU, seed=0, channels_last=True, num_workers=0)
    train, evaluation = make_loaders(imagenet, dataset, dtype=torch.bfloat16, **options)
    assert isinstance(train, StreamingLoader) and set(evaluation) == {"val", "test"}
    x, _ = next(iter(train.epoch(0)))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    assert cache_path(imagenet, "val", 32).is_file() and cache_path(imagenet, "test", 32).is_file()
    with pytest.raises(ConfigError, match=r"dataset\.gpu_decode: .*needs a CUDA training device"):
        make_loaders(imagenet, DatasetConfig(name="imagenet", image_size=32, gpu_decode=True), **options)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decoding_gives_the_workers_views(imagenet: Prepared) -> None:
    """dataset.gpu_decode on hardware: nvjpeg's batched decode and the GPU resize give the workers' views (same
    samples, boxes and flips) up to the decoders' rounding, as uint8 channels-last normalised on the GPU."""
    cuda = torch.device("cuda")
    normalise = Normalise([0.0] * 3, [1 / 255] * 3, cuda, channels_last=True)
    on_gpu = collect(StreamingLoader(imagenet.train, batch_size=4, image_size=32, normalise=normalise, device=cuda,
                                     seed=0, decode_device=cuda), 1)
    in_workers = collect(streaming(imagenet), 1)
    assert on_gpu[0].is_cuda and on_gpu[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(on_gpu[1].cpu(), in_workers[1])
    difference = (on_gpu[0].cpu() - in_workers[0]).abs()
    assert difference.mean() < 1.5 and difference.max() <= 16
