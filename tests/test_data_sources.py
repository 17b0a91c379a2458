"""The dataset layer end to end: upstream formats -> prepare -> load_prepared -> StreamingLoader.

Every dataset except digits is generated in its exact upstream on-disk layout (tests/data_fixtures.py) and
goes through the same code path users run on the real files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
from collections import Counter
from itertools import product
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets
from PIL import Image
from sklearn.datasets import load_digits

from reproduce.data import dataset_names
from reproduce.data import prepare as prepare_module
from reproduce.data.errors import DataFormatError, DataNotPreparedError
from reproduce.data.prepare import IMAGENET_MEAN, IMAGENET_STD, FileSplit, Prepared, Split, load_prepared, prepare
from reproduce.data.sources import cifar
from reproduce.data.split import stratified_split
from reproduce.errors import ConfigError, UserError
from tests.data_fixtures import (WrittenArrays, write_cifar10, write_cifar100, write_fashion_mnist, write_imagenet,
                                 write_tinyimagenet)

VAL_FRACTION = 0.2

# dataset name -> (fixture writer, its keyword arguments, image shape)
TENSOR_FIXTURES = {
    "fashion-mnist": (write_fashion_mnist, {}, (1, 28, 28)),
    "fashion-mnist-gz": (write_fashion_mnist, {"gz": True}, (1, 28, 28)),
    "cifar10": (write_cifar10, {}, (3, 32, 32)),
    "cifar100": (write_cifar100, {}, (3, 32, 32)),
    "tinyimagenet": (write_tinyimagenet, {}, (3, 64, 64)),
}


def run_prepare(name: str, raw_root: Path, out_root: Path, *, split_seed: int = 0, **options) -> Prepared:
    directory = prepare(name, raw_root, out_root, val_fraction=VAL_FRACTION, split_seed=split_seed,
                        verify_md5=False, progress=False, **options)
    assert directory == out_root / name
    return load_prepared(directory, verify=True)


def samples(images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> Counter:
    """The multiset of (pixels, label) pairs: split membership without relying on order."""
    images, labels = np.asarray(images), np.asarray(labels)
    return Counter((image.tobytes(), int(label)) for image, label in zip(images, labels))


def source_indices(split: Split, written: WrittenArrays) -> list[int]:
    """Which official training images ended up in ``split`` (fixture images are random, hence unique)."""
    index_of = {image.tobytes(): index for index, image in enumerate(written.train_images)}
    assert len(index_of) == len(written.train_images)
    return [index_of[image.tobytes()] for image in split.images.numpy()]


def expected_held_out(labels: np.ndarray, fraction: float) -> dict[int, int]:
    counts = Counter(labels.tolist())
    return {label: min(int(np.floor(count * fraction + 0.5)), count - 1) for label, count in counts.items()}


# ----------------------------------------------------------------------------------------------
# Round trips through the real readers


@pytest.mark.parametrize("fixture", TENSOR_FIXTURES)
def test_tensor_dataset_round_trip(fixture: str, tmp_path: Path) -> None:
    writer, options, image_shape = TENSOR_FIXTURES[fixture]
    name = fixture.removesuffix("-gz")
    written = writer(tmp_path / "raw", **options)
    prepared = run_prepare(name, tmp_path / "raw", tmp_path / "prepared")

    assert prepared.storage == "tensor"
    assert prepared.num_classes == len(written.class_names)
    assert prepared.in_channels == image_shape[0]
    manifest = prepared.manifest
    assert manifest["dataset"] == name and manifest["format_version"] == 1
    assert manifest["class_names"] == written.class_names
    assert manifest["image_shape"] == list(image_shape)
    assert manifest["val_fraction"] == VAL_FRACTION and manifest["split_seed"] == 0
    assert str((tmp_path / "raw").resolve()) in manifest["source"]
    for part in ("train", "val", "test"):
        split = getattr(prepared, part)
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert tuple(split.images.shape[1:]) == image_shape
        assert manifest["counts"][part] == len(split.labels) == len(split.images)

    # The official test set is kept whole and in order.
    np.testing.assert_array_equal(prepared.test.images.numpy(), written.test_images)
    np.testing.assert_array_equal(prepared.test.labels.numpy(), written.test_labels)
    # train + val is exactly the official training set, pixels and labels.
    assert (samples(prepared.train.images, prepared.train.labels) + samples(prepared.val.images, prepared.val.labels)
            == samples(written.train_images, written.train_labels))

    # Normalisation statistics come from the train part only.
    train_pixels = prepared.train.images.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(manifest["mean"], train_pixels.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(manifest["std"], train_pixels.std(axis=(0, 2, 3)), rtol=1e-9)


def test_cifar_rows_become_nchw_planes(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "raw", n_train=50, n_test=7)
    prepared = run_prepare("cifar10", tmp_path / "raw", tmp_path / "prepared")
    with (tmp_path / "raw" / "cifar-10-batches-py" / "test_batch").open("rb") as stream:
        rows = pickle.load(stream, encoding="bytes")[b"data"]
    for image in (0, 6):
        # Byte c*1024 + y*32 + x of a row is channel c, row y, column x.
        expected = [rows[image][c * 1024 + y * 32 + x] for c, y, x in product(range(3), range(32), range(32))]
        np.testing.assert_array_equal(prepared.test.images[image].numpy().ravel(), expected)


def test_cifar100_uses_fine_labels_and_names(tmp_path: Path) -> None:
    written = write_cifar100(tmp_path / "raw")
    prepared = run_prepare("cifar100", tmp_path / "raw", tmp_path / "prepared")
    assert prepared.num_classes == 100
    assert prepared.manifest["class_names"][:2] == ["fine_class_00", "fine_class_01"]
    np.testing.assert_array_equal(prepared.test.labels.numpy(), written.test_labels)
    assert prepared.test.labels.max() > 19  # a coarse label (0..19) could never reach this


def test_tinyimagenet_labels_follow_sorted_wnids_not_file_order(tmp_path: Path) -> None:
    written = write_tinyimagenet(tmp_path / "raw", n_classes=4)
    root = tmp_path / "raw" / "tiny-imagenet-200"
    listed = (root / "wnids.txt").read_text().split()
    assert listed != sorted(listed)  # the fixture really tests the ordering
    prepared = run_prepare("tinyimagenet", tmp_path / "raw", tmp_path / "prepared")
    words = dict(line.split("\t") for line in (root / "words.txt").read_text().splitlines())
    assert prepared.manifest["class_names"] == [words[wnid] for wnid in sorted(listed)]
    np.testing.assert_array_equal(prepared.test.labels.numpy(), written.test_labels)
    # Grayscale JPEGs are decoded to three equal channels.
    grayscale = prepared.test.images[1]
    assert torch.equal(grayscale[0], grayscale[1]) and torch.equal(grayscale[1], grayscale[2])


def test_digits_is_real_data_with_a_fixed_test_split(tmp_path: Path) -> None:
    first = run_prepare("digits", tmp_path / "unused", tmp_path / "seed0", split_seed=0)
    second = run_prepare("digits", tmp_path / "unused", tmp_path / "seed1", split_seed=1)

    assert sum(first.manifest["counts"].values()) == 1797
    assert first.num_classes == 10 and first.in_channels == 1
    assert first.manifest["class_names"] == [str(digit) for digit in range(10)]
    assert tuple(first.train.images.shape[1:]) == (1, 8, 8)
    assert len(first.test.labels) == pytest.approx(1797 * 0.25, abs=10)
    digits = load_digits()
    expected = np.rint(digits.images * 255 / 16).astype(np.uint8)[:, None]
    everything = Counter()
    for split in (first.train, first.val, first.test):
        everything += samples(split.images, split.labels)
    assert everything == samples(expected, digits.target)

    assert torch.equal(first.test.images, second.test.images) and torch.equal(first.test.labels, second.test.labels)
    assert not torch.equal(first.val.images, second.val.images)


def test_imagenet_is_indexed_as_files(tmp_path: Path) -> None:
    written = write_imagenet(tmp_path / "raw", n_classes=3, per_class=10)
    prepared = run_prepare("imagenet", tmp_path / "raw", tmp_path / "prepared")

    assert prepared.storage == "files" and prepared.in_channels == 3 and prepared.num_classes == 3
    assert prepared.manifest["class_names"] == sorted(written.class_names)
    assert prepared.manifest["mean"] == IMAGENET_MEAN and prepared.manifest["std"] == IMAGENET_STD
    for split in (prepared.train, prepared.val, prepared.test):
        assert isinstance(split, FileSplit)
        assert all(Path(path).is_absolute() and Path(path).is_file() for path in split.paths)
        # A label is the index of the image's wnid folder among the sorted wnids.
        assert split.labels == [written.class_names.index(Path(path).parent.name) for path in split.paths]
    assert prepared.test.paths == [str(path.resolve()) for path in written.test_paths]
    assert prepared.test.labels == written.test_labels.tolist()
    train_paths, val_paths = set(prepared.train.paths), set(prepared.val.paths)
    assert not train_paths & val_paths
    assert train_paths | val_paths == {str(path.resolve()) for path in written.train_paths}
    assert Counter(prepared.val.labels) == expected_held_out(written.train_labels, VAL_FRACTION)


# ----------------------------------------------------------------------------------------------
# The train/validation split


def test_split_is_stratified_disjoint_complete_and_seeded(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path / "raw", n_train=200)
    first = run_prepare("cifar10", tmp_path / "raw", tmp_path / "a", split_seed=3)
    again = run_prepare("cifar10", tmp_path / "raw", tmp_path / "b", split_seed=3)
    other = run_prepare("cifar10", tmp_path / "raw", tmp_path / "c", split_seed=4)

    train, val = set(source_indices(first.train, written)), set(source_indices(first.val, written))
    assert not train & val
    assert train | val == set(range(200))
    assert Counter(first.val.labels.tolist()) == expected_held_out(written.train_labels, VAL_FRACTION)
    assert first.val.labels.tolist() == written.train_labels[sorted(val)].tolist()

    assert source_indices(again.val, written) == source_indices(first.val, written)
    assert set(source_indices(other.val, written)) != val
    assert Counter(other.val.labels.tolist()) == Counter(first.val.labels.tolist())


def test_stratified_split_keeps_every_class_in_training() -> None:
    labels = np.array([0] * 5 + [1] * 2 + [2])
    kept, held_out = stratified_split(labels, 0.5, seed=0)
    assert sorted(labels[held_out].tolist()) == [0, 0, 0, 1]  # round(2.5) = 3, round(1.0) = 1, never the last one
    assert set(labels[kept].tolist()) == {0, 1, 2}


# ----------------------------------------------------------------------------------------------
# The cache: manifest, checksums, atomic replacement


def test_manifest_checksums_detect_a_modified_cache_file(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "raw")
    directory = prepare("cifar10", tmp_path / "raw", tmp_path / "prepared", val_fraction=VAL_FRACTION,
                        split_seed=0, verify_md5=False, progress=False)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert set(manifest["sha256"]) == {"train.pt", "val.pt", "test.pt"}
    for file, digest in manifest["sha256"].items():
        assert hashlib.sha256((directory / file).read_bytes()).hexdigest() == digest
    load_prepared(directory, verify=True)

    content = bytearray((directory / "val.pt").read_bytes())
    content[len(content) // 2] ^= 0xFF
    (directory / "val.pt").write_bytes(bytes(content))
    with pytest.raises(ValueError, match=r"val\.pt.*sha256"):
        load_prepared(directory, verify=True)


def test_missing_prepared_cache_says_how_to_make_it_for_that_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataNotPreparedError) as raised:
        load_prepared(tmp_path / "prepared" / "cifar100")
    message = str(raised.value)
    assert isinstance(raised.value, UserError) and isinstance(raised.value, FileNotFoundError)
    assert str(tmp_path / "prepared" / "cifar100") in message
    assert "`python -m reproduce prepare --set dataset.name=cifar100`" in message and "--params/--set" in message


def test_train_on_an_unprepared_dataset_advises_preparing_that_dataset(prepared_root: Path, tmp_path: Path) -> None:
    from reproduce.train import RunSpec, train
    from tests.conftest import tiny_config

    config = tiny_config(prepared_root, tmp_path, dataset={"name": "cifar100"})
    with pytest.raises(DataNotPreparedError, match=r"prepare --set dataset\.name=cifar100`"):
        train(config, RunSpec("vanilla", 0, tmp_path / "run", tmp_path / "checkpoints"), track=False)
    assert not (tmp_path / "run").exists()


def _damage_tensor_split(directory: Path) -> Path:
    (directory / "train.pt").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return directory / "train.pt"


def _truncate_tensor_split(directory: Path) -> Path:
    content = (directory / "test.pt").read_bytes()
    (directory / "test.pt").write_bytes(content[: len(content) // 2])
    return directory / "test.pt"


def _damage_manifest(directory: Path) -> Path:
    (directory / "manifest.json").write_text('{"format_version": 1, "files": ')
    return directory / "manifest.json"


def _drop_manifest_key(directory: Path) -> Path:
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["counts"]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory / "manifest.json"


def _pickled_dict_split(directory: Path) -> Path:
    torch.save({"images": [1, 2, 3]}, directory / "val.pt")
    return directory / "val.pt"


@pytest.mark.parametrize("damage", [_damage_tensor_split, _truncate_tensor_split, _damage_manifest,
                                    _drop_manifest_key, _pickled_dict_split])
def test_damaged_prepared_cache_is_one_line_naming_the_file_and_the_fix(damage, tmp_path: Path) -> None:
    write_cifar10(tmp_path / "raw")
    directory = prepare("cifar10", tmp_path / "raw", tmp_path / "prepared", val_fraction=VAL_FRACTION,
                        split_seed=0, verify_md5=False, progress=False)
    damaged = damage(directory)
    with pytest.raises(DataFormatError) as raised:
        load_prepared(directory)
    message = str(raised.value)
    assert isinstance(raised.value, UserError) and "\n" not in message
    assert str(damaged) in message
    assert f"delete {directory} and run `python -m reproduce prepare --set dataset.name=cifar10`" in message
    assert "weights_only" not in message  # torch's advice would be the wrong fix for a damaged cache


def test_interrupted_prepare_leaves_no_partial_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10(tmp_path / "raw")
    out_root = tmp_path / "prepared"
    real_write_split = prepare_module._write_split
    calls = []

    def write_then_fail(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        real_write_split(path, images, labels)

    monkeypatch.setattr(prepare_module, "_write_split", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        prepare("cifar10", tmp_path / "raw", out_root, val_fraction=VAL_FRACTION, split_seed=0,
                verify_md5=False, progress=False)
    assert calls == ["train.pt", "val.pt"]
    assert list(out_root.iterdir()) == []

    monkeypatch.setattr(prepare_module, "_write_split", real_write_split)
    good = run_prepare("cifar10", tmp_path / "raw", out_root, split_seed=0)
    before = {path.name: path.read_bytes() for path in (out_root / "cifar10").iterdir()}

    calls.clear()
    monkeypatch.setattr(prepare_module, "_write_split", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        prepare("cifar10", tmp_path / "raw", out_root, val_fraction=VAL_FRACTION, split_seed=1,
                verify_md5=False, progress=False)
    assert [path.name for path in out_root.iterdir()] == ["cifar10"]
    assert {path.name: path.read_bytes() for path in (out_root / "cifar10").iterdir()} == before
    assert torch.equal(load_prepared(out_root / "cifar10", verify=True).val.images, good.val.images)


def test_successful_prepare_replaces_the_previous_cache(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "raw")
    run_prepare("cifar10", tmp_path / "raw", tmp_path / "prepared", split_seed=0)
    replaced = run_prepare("cifar10", tmp_path / "raw", tmp_path / "prepared", split_seed=1)
    assert replaced.manifest["split_seed"] == 1
    assert [path.name for path in (tmp_path / "prepared").iterdir()] == ["cifar10"]


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(("name", "expected_path", "hint"), [
    ("fashion-mnist", "FashionMNIST/raw/train-images-idx3-ubyte", "--download"),
    ("cifar10", "cifar-10-batches-py", "--download"),
    ("cifar100", "cifar-100-python", "--download"),
    ("tinyimagenet", "tiny-imagenet-200", "--download"),
    ("imagenet", "imagenet/train", "image-net.org"),
])
def test_missing_data_names_the_path_and_how_to_get_it(name: str, expected_path: str, hint: str,
                                                       tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as raised:
        prepare(name, tmp_path / "raw", tmp_path / "prepared", val_fraction=VAL_FRACTION, split_seed=0,
                progress=False)
    assert str(tmp_path / "raw" / expected_path) in str(raised.value)
    assert hint in str(raised.value)
    assert not (tmp_path / "prepared" / name).exists()


def test_imagenet_cannot_be_downloaded(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="licence"):
        prepare("imagenet", tmp_path / "raw", tmp_path / "prepared", val_fraction=VAL_FRACTION, split_seed=0,
                download=True, progress=False)


def test_download_fetches_with_torchvision_then_reads_with_our_reader(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    requests = []

    def fake_cifar10(root: str, download: bool) -> None:
        requests.append((root, download))
        write_cifar10(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    prepared = run_prepare("cifar10", tmp_path / "raw", tmp_path / "prepared", download=True)
    assert requests == [(str(tmp_path / "raw"), True)]
    assert prepared.manifest["counts"]["test"] == 20

    run_prepare("cifar10", tmp_path / "raw", tmp_path / "again", download=True)
    assert len(requests) == 1  # data already present: nothing is fetched


def test_failed_download_says_what_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(root: str, download: bool) -> None:
        raise URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(FileNotFoundError, match=r"Downloading fashion-mnist .* failed .*no network"):
        run_prepare("fashion-mnist", tmp_path / "raw", tmp_path / "prepared", download=True)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_file_is_a_clear_error(gz: bool, tmp_path: Path) -> None:
    written = write_fashion_mnist(tmp_path / "raw", gz=gz)
    images_file = next(path for path in written.files if path.name.startswith("train-images"))
    images_file.write_bytes(images_file.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"truncated") as raised:
        run_prepare("fashion-mnist", tmp_path / "raw", tmp_path / "prepared")
    assert str(images_file) in str(raised.value)
    assert not (tmp_path / "prepared" / "fashion-mnist").exists()


def test_idx_file_with_the_wrong_magic_number_is_rejected(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path / "raw")
    directory = tmp_path / "raw" / "FashionMNIST" / "raw"
    (directory / "t10k-images-idx3-ubyte").write_bytes((directory / "t10k-labels-idx1-ubyte").read_bytes())
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte has IDX magic number 2049, expected 2051"):
        run_prepare("fashion-mnist", tmp_path / "raw", tmp_path / "prepared")


@pytest.mark.parametrize(("writer", "name", "file"), [
    (write_cifar10, "cifar10", "data_batch_3"),
    (write_cifar100, "cifar100", "train"),
])
def test_truncated_cifar_pickle_is_a_clear_error(writer, name: str, file: str, tmp_path: Path) -> None:
    written = writer(tmp_path / "raw")
    damaged = next(path for path in written.files if path.name == file)
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"truncated or corrupt") as raised:
        run_prepare(name, tmp_path / "raw", tmp_path / "prepared")
    assert str(damaged) in str(raised.value)


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path / "raw")
    written.files[0].write_bytes(pickle.dumps({b"data": Path("x"), b"labels": []}, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_1.*refusing to load pathlib"):
        run_prepare("cifar10", tmp_path / "raw", tmp_path / "prepared")


def test_md5_mismatch_names_the_file(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "raw")
    with pytest.raises(ValueError, match=r"data_batch_1 has md5 .*official CIFAR-10 md5.*--no-verify-md5"):
        prepare("cifar10", tmp_path / "raw", tmp_path / "prepared", val_fraction=VAL_FRACTION, split_seed=0,
                verify_md5=True, progress=False)
    assert not (tmp_path / "prepared" / "cifar10").exists()


def test_md5_check_accepts_files_matching_the_listed_sums(tmp_path: Path) -> None:
    written = write_cifar100(tmp_path / "raw")
    md5 = {path.name: hashlib.md5(path.read_bytes()).hexdigest() for path in written.files}
    release = dataclasses.replace(cifar.CIFAR100, train_files=(("train", md5["train"]),),
                                  test_files=(("test", md5["test"]),), meta_file=("meta", md5["meta"]))
    data = cifar.read_cifar(release, tmp_path / "raw", verify_md5=True, progress=False)
    np.testing.assert_array_equal(data.test_images, written.test_images)


def test_unknown_dataset_lists_the_known_ones(tmp_path: Path) -> None:
    assert dataset_names() == sorted(["digits", "fashion-mnist", "cifar10", "cifar100", "tinyimagenet", "imagenet"])
    with pytest.raises(ConfigError, match="dataset.name: unknown dataset 'cifar1000' .*did you mean 'cifar100'") as raised:
        prepare("cifar1000", tmp_path, tmp_path / "prepared", val_fraction=VAL_FRACTION, split_seed=0)
    assert all(name in str(raised.value) for name in dataset_names())
    assert not (tmp_path / "prepared").exists()


@pytest.mark.parametrize("val_fraction", [1.0, -0.1, 1.5, True, "0.1"])
def test_val_fraction_must_be_inside_zero_one(val_fraction, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"dataset\.val_fraction"):
        prepare("digits", tmp_path, tmp_path / "prepared", val_fraction=val_fraction, split_seed=0, progress=False)
    assert not (tmp_path / "prepared").exists()


def test_val_fraction_too_small_for_any_validation_image(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "raw", n_train=50)
    with pytest.raises(ValueError, match=r"dataset\.val_fraction=0\.01 leaves no validation images"):
        prepare("cifar10", tmp_path / "raw", tmp_path / "prepared", val_fraction=0.01, split_seed=0,
                verify_md5=False, progress=False)


# ----------------------------------------------------------------------------------------------
# The "files" storage index (its loaders: tests/test_streaming.py)


@pytest.fixture
def imagenet_prepared(tmp_path: Path) -> Prepared:
    write_imagenet(tmp_path / "raw", n_classes=3, per_class=10, val_per_class=3)
    return run_prepare("imagenet", tmp_path / "raw", tmp_path / "prepared")


def test_damaged_file_index_is_a_clear_error(imagenet_prepared: Prepared, tmp_path: Path) -> None:
    directory = tmp_path / "prepared" / "imagenet"
    (directory / "val.json").write_text('{"paths": ["train/a.JPEG"], "labels": []}')
    with pytest.raises(DataFormatError, match=r"val\.json is not an index of paths with matching labels; delete"):
        load_prepared(directory)
    (directory / "val.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(DataFormatError, match=r"val\.json is not valid JSON"):
        load_prepared(directory)
