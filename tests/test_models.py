"""The model zoo: registry, the SplitNet contract, input flexibility and parameter counts."""

import copy
import functools
from collections.abc import Iterator
from decimal import Decimal

import pytest
import torch
from torch import nn

from reproduce.models import SplitNet, available, create, register

NUM_CLASSES = 10
BATCH = 2


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """Batch-2 toy inputs gain nothing from threads, and on a shared 2-core machine competing
    intra-op thread pools slowed this module ~10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def eval_model(name: str, in_channels: int) -> SplitNet:
    """Built once per (name, in_channels) for the whole module; tests only read it."""
    torch.manual_seed(0)
    return create(name, NUM_CLASSES, in_channels).eval()


def images(size: int, in_channels: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(size)
    return torch.randn(BATCH, in_channels, size, size, generator=generator)


def parameter_count(name: str, num_classes: int) -> int:
    # The meta device allocates no memory and skips random init: counting stays cheap for 20 M nets.
    with torch.device("meta"):
        model = create(name, num_classes)
    return sum(parameter.numel() for parameter in model.parameters())


def test_registry_holds_the_whole_zoo() -> None:
    expected = {
        *(f"resnet{depth}" for depth in (8, 14, 20, 32, 44, 56, 110)),
        "resnet8x4",
        "resnet32x4",
        "ResNet50",
        *(f"wrn_{depth}_{widen}" for depth, widen in ((16, 1), (16, 2), (16, 8), (40, 1), (40, 2))),
        *(f"vgg{depth}" for depth in (8, 11, 13, 16, 19)),
        "mobilenetv2",
        "mobilenetv2_0.5",
        "mobilenetv2_1.4",
        "MobileNetV2",
        "ShuffleV1",
        "ShuffleV2",
        "resnet18",
        "resnet34",
        "resnet50",
    }
    assert available() == sorted(expected)


def test_unknown_name_lists_the_available_models() -> None:
    with pytest.raises(ValueError, match="nope") as error:
        create("nope", NUM_CLASSES)
    assert ", ".join(available()) in str(error.value)


def test_a_name_cannot_be_registered_twice() -> None:
    with pytest.raises(ValueError, match="resnet20"):
        register("resnet20")(lambda num_classes, in_channels: create("resnet8", num_classes))


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", available())
def test_logits_for_any_input_size(name: str, in_channels: int) -> None:
    model = eval_model(name, in_channels)
    assert isinstance(model, SplitNet)
    # 8x8 digits, 28x28 FashionMNIST, 32x32 CIFAR: deep nets must not pool small maps away.
    with torch.no_grad():
        for size in (8, 28, 32):
            logits = model(images(size, in_channels))
            assert logits.shape == (BATCH, NUM_CLASSES)
            assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", available())
def test_head_ends_with_pooling_flatten_and_classifier(name: str) -> None:
    head = eval_model(name, 3).head
    assert isinstance(head[-3], nn.AdaptiveAvgPool2d)
    assert isinstance(head[-2], nn.Flatten)
    assert head[-1] is eval_model(name, 3).classifier
    assert isinstance(head[-1], nn.Linear)
    assert head[-1].out_features == NUM_CLASSES
    # The last stage lives in the head, so a grafted head has something to train besides the linear.
    assert any(isinstance(module, nn.Conv2d) for module in head.modules())


@pytest.mark.parametrize("name", available())
def test_forward_is_head_of_trunk_and_features_feed_the_classifier(name: str) -> None:
    model = eval_model(name, 3)
    x = images(32)
    with torch.no_grad():
        logits = model(x)
        assert torch.equal(logits, model.head(model.trunk(x)))
        features = model.features(x)
        assert features.shape == (BATCH, model.classifier.in_features)
        assert torch.equal(model.classifier(features), logits)


@pytest.mark.parametrize("name", available())
def test_grafted_head_copy_reproduces_the_logits(name: str) -> None:
    """SOKD's graft: a deep copy of the head on the detached trunk output."""
    model = eval_model(name, 3)
    graft = copy.deepcopy(model.head)
    x = images(32)
    with torch.no_grad():
        assert torch.equal(graft(model.trunk(x).detach()), model(x))
    original_storage = {parameter.data_ptr() for parameter in model.head.parameters()}
    assert not any(parameter.data_ptr() in original_storage for parameter in graft.parameters())


# Published counts in millions, written as printed (the number of decimals is the precision), and
# the count of this implementation, computed once. The exact count pins the architecture; it must
# agree with the published figure within 2% or within half a unit of its last printed digit.
# Figures: CIFAR-100 counts of the CRD / RepDistiller model set; wrn_16_1 and wrn_16_8 at
# 10 classes; SwitOKD's 1.4x MobileNetV2 on Tiny-ImageNet (200 classes).
PUBLISHED_COUNTS = [
    ("resnet8", 100, "0.08", 83_892),
    ("resnet20", 100, "0.28", 278_324),
    ("resnet32", 100, "0.47", 472_756),
    ("resnet56", 100, "0.86", 861_620),
    ("resnet110", 100, "1.74", 1_736_564),
    ("resnet8x4", 100, "1.23", 1_233_540),
    ("resnet32x4", 100, "7.43", 7_433_860),
    ("ResNet50", 100, "23.7", 23_705_252),
    ("wrn_16_1", 10, "0.18", 175_066),
    ("wrn_16_2", 100, "0.70", 703_284),
    ("wrn_16_8", 10, "11.0", 10_961_370),
    ("wrn_40_1", 100, "0.57", 569_780),
    ("wrn_40_2", 100, "2.26", 2_255_156),
    ("vgg8", 100, "3.96", 3_963_556),
    ("vgg13", 100, "9.46", 9_459_236),
    # CRD's code rounds MobileNetV2 channels differently (0.813 M); see mobilenetv2.py.
    ("MobileNetV2", 100, "0.81", 815_780),
    ("mobilenetv2_0.5", 100, "0.81", 815_780),
    ("mobilenetv2_1.4", 200, "4.7", 4_674_376),
    ("ShuffleV1", 100, "0.95", 949_258),
    ("ShuffleV2", 100, "1.36", 1_356_104),
]


@pytest.mark.parametrize(("name", "num_classes", "published", "exact"), PUBLISHED_COUNTS)
def test_parameter_count_matches_the_published_figure(
    name: str, num_classes: int, published: str, exact: int
) -> None:
    count = parameter_count(name, num_classes)
    assert count == exact
    published_count = float(published) * 1e6
    half_last_digit = 0.5 * 10 ** (6 + Decimal(published).as_tuple().exponent)
    assert abs(count - published_count) <= max(0.02 * published_count, half_last_digit)


# torchvision's documented ImageNet (1000-class) counts: our wrappers must add or drop nothing.
@pytest.mark.parametrize(
    ("name", "exact"),
    [
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("mobilenetv2", 3_504_872),
    ],
)
def test_imagenet_parameter_count_matches_torchvision(name: str, exact: int) -> None:
    assert parameter_count(name, 1000) == exact
