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
        "ResNet18",
        "ResNet50",
        *(f"wrn_{depth}_{widen}" for depth, widen in ((16, 1), (16, 2), (16, 8), (40, 1), (40, 2))),
        *(f"switokd_wrn_16_{widen}" for widen in (1, 2, 8)),
        *(f"vgg{depth}" for depth in (8, 11, 13, 16, 19)),
        "MobileNetV1",
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
    # mdistiller's ImageNet MobileNetV1 (DKD's ResNet-50 -> MobileNetV1 row); the MobileNet paper's 4.2 M.
    ("MobileNetV1", 1000, "4.2", 4_231_976),
    ("wrn_16_1", 10, "0.18", 175_066),
    ("wrn_16_2", 100, "0.70", 703_284),
    ("wrn_16_8", 10, "11.0", 10_961_370),
    ("wrn_40_1", 100, "0.57", 569_780),
    ("wrn_40_2", 100, "2.26", 2_255_156),
    # The official VGGs keep a bias in every convolution (without: 3,963,556 and 9,459,236).
    ("vgg8", 100, "3.96", 3_965_028),
    ("vgg13", 100, "9.46", 9_462_180),
    # CRD's mobile_half (int() widths, an expansion conv in the t = 1 block): 812,836 officially.
    ("MobileNetV2", 100, "0.81", 812_836),
    ("mobilenetv2_0.5", 100, "0.81", 812_836),
    ("mobilenetv2_1.4", 200, "4.7", 4_674_376),
    ("ShuffleV1", 100, "0.95", 949_258),
    # CRD's 1x1 stem (a 3x3 one gave 1,356,104); 1,355,528 officially.
    ("ShuffleV2", 100, "1.36", 1_355_528),
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


# Counts of the official definitions themselves, where no paper prints one to compare with:
# SwitOKD's models/wrnet*.py (WRN-16-2 teacher on CIFAR-100, WRN-16-8 / WRN-16-1 on CIFAR-10), CRD's
# ResNet18 and CRD's other VGGs.
OFFICIAL_COUNTS = [
    ("switokd_wrn_16_2", 100, 704_420),
    ("switokd_wrn_16_8", 10, 10_965_866),
    ("switokd_wrn_16_1", 10, 175_626),
    # CRD's resnetv2.py ResNet18: mdistiller's Tiny-ImageNet teacher (200 classes).
    ("ResNet18", 200, 11_271_432),
    ("vgg11", 100, 9_277_284),
    ("vgg16", 100, 14_774_436),
    ("vgg19", 100, 20_086_692),
]


@pytest.mark.parametrize(("name", "num_classes", "exact"), OFFICIAL_COUNTS)
def test_parameter_count_matches_the_official_definition(
    name: str, num_classes: int, exact: int
) -> None:
    assert parameter_count(name, num_classes) == exact


def stage_shapes(model: SplitNet, x: torch.Tensor) -> list[tuple[int, ...]]:
    """(C, H, W) after each trunk module and each head module before the global pooling."""
    shapes: list[tuple[int, ...]] = []
    with torch.no_grad():
        out = x
        for module in model.trunk:
            out = module(out)
            shapes.append(tuple(out.shape[1:]))
        for module in model.head:
            if isinstance(module, nn.AdaptiveAvgPool2d):
                break
            out = module(out)
            shapes.append(tuple(out.shape[1:]))
    return shapes


# Per network at 32x32, the maps the official forward passes produce: CRD's f0..f4 (stem, then each
# stage), and for SwitOKD's WRN the stride-2 stages at 16x16 and 8x8.
STAGE_SHAPES = {
    "ShuffleV1": [
        (24, 32, 32),  # 1x1 stem conv + BN
        (24, 32, 32),  # ReLU
        (240, 16, 16),
        (480, 8, 8),
        (960, 4, 4),  # last stage, in the head
    ],
    "ShuffleV2": [
        (24, 32, 32),
        (24, 32, 32),
        (116, 16, 16),
        (232, 8, 8),
        (464, 4, 4),
        (1024, 4, 4),  # 1x1 conv + BN
        (1024, 4, 4),  # ReLU
    ],
    # The stride-2 stem and stride-1 second stage: 16x16 already after the stem, 2x2 at the end.
    "MobileNetV2": [
        (16, 16, 16),
        (8, 16, 16),
        (12, 16, 16),
        (16, 8, 8),
        (32, 4, 4),
        (48, 4, 4),
        (80, 2, 2),
        (160, 2, 2),
        (1280, 2, 2),
    ],
    "vgg8": [
        (64, 32, 32),
        (64, 16, 16),
        (128, 16, 16),
        (128, 8, 8),
        (256, 8, 8),
        (256, 4, 4),
        (512, 4, 4),
        (512, 4, 4),  # the last block is not pooled for inputs below 64x64
    ],
    "vgg13": [
        (64, 32, 32),
        (64, 16, 16),
        (128, 16, 16),
        (128, 8, 8),
        (256, 8, 8),
        (256, 4, 4),
        (512, 4, 4),
        (512, 4, 4),
    ],
    "switokd_wrn_16_2": [
        (16, 32, 32),
        (32, 32, 32),
        (64, 16, 16),
        (128, 8, 8),
        (128, 8, 8),  # final BN
        (128, 8, 8),  # ReLU
    ],
    "switokd_wrn_16_8": [
        (16, 32, 32),
        (128, 32, 32),
        (256, 16, 16),
        (512, 8, 8),
        (512, 8, 8),
        (512, 8, 8),
    ],
    "switokd_wrn_16_1": [
        (16, 32, 32),
        (16, 32, 32),
        (32, 16, 16),
        (64, 8, 8),
        (64, 8, 8),
        (64, 8, 8),
    ],
}
STAGE_SHAPES["mobilenetv2_0.5"] = STAGE_SHAPES["MobileNetV2"]


@pytest.mark.parametrize("name", sorted(STAGE_SHAPES))
def test_stage_output_shapes_at_32x32(name: str) -> None:
    assert stage_shapes(eval_model(name, 3), images(32)) == STAGE_SHAPES[name]


def modules_of(model: nn.Module, kind: type[nn.Module]) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, kind)]


def is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def test_shufflev1_has_a_relu_after_the_depthwise_conv_and_bn() -> None:
    """CRD's ShuffleV1 unit: F.relu(bn2(conv2(out))) on the depthwise conv."""
    model = eval_model("ShuffleV1", 3)
    expands = [module.expand for module in model.modules() if hasattr(module, "expand")]
    assert len(expands) == 4 + 8 + 4
    for expand in expands:
        kinds = [type(module) for module in expand]
        assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d]
        assert is_depthwise(expand[0]) and expand[0].kernel_size == (3, 3)
    # And the ReLU acts: the depthwise BN output has negatives, the next conv never sees one.
    bn_minimum: list[float] = []
    conv_input_minimum: list[float] = []
    handles = []
    for expand in expands:
        handles.append(
            expand[1].register_forward_hook(
                lambda _m, _i, out: bn_minimum.append(out.min().item())
            )
        )
        handles.append(
            expand[3].register_forward_pre_hook(
                lambda _m, inputs: conv_input_minimum.append(inputs[0].min().item())
            )
        )
    try:
        with torch.no_grad():
            model(images(32))
    finally:
        for handle in handles:
            handle.remove()
    assert len(bn_minimum) == len(conv_input_minimum) == len(expands)
    assert all(minimum < 0 for minimum in bn_minimum)
    assert all(minimum >= 0 for minimum in conv_input_minimum)


def test_shufflev2_keeps_its_depthwise_conv_linear() -> None:
    """CRD's ShuffleV2 has no ReLU after bn2 / bn1 / bn4 (the depthwise convs), unlike ShuffleV1."""
    model = eval_model("ShuffleV2", 3)
    sequences = [module for module in model.modules() if isinstance(module, nn.Sequential)]
    depthwise_blocks = 0
    for sequence in sequences:
        children = list(sequence)
        for index, child in enumerate(children):
            if isinstance(child, nn.Sequential) and isinstance(child[0], nn.Conv2d):
                if is_depthwise(child[0]):
                    depthwise_blocks += 1
                    following = children[index + 1]
                    assert isinstance(following, nn.Sequential)
                    assert isinstance(following[0], nn.Conv2d)
    # One per unit plus one more in each stage's down unit.
    assert depthwise_blocks == 4 + 8 + 4 + 3


def test_crd_mobilenetv2_structure() -> None:
    model = eval_model("MobileNetV2", 3)
    assert not modules_of(model, nn.ReLU6)
    stem_conv = model.trunk[0][0]
    assert stem_conv.stride == (2, 2) and stem_conv.out_channels == 16
    first_block = model.trunk[1][0]
    # The t = 1 block keeps its 1x1 expansion conv (16 -> 16), then depthwise, then projection.
    convs = modules_of(first_block, nn.Conv2d)
    assert [(conv.in_channels, conv.out_channels, conv.kernel_size) for conv in convs] == [
        (16, 16, (1, 1)),
        (16, 16, (3, 3)),
        (16, 8, (1, 1)),
    ]
    assert is_depthwise(convs[1])
    # Every conv is followed by its BN.
    for sequence in modules_of(model, nn.Sequential):
        children = list(sequence)
        for index, child in enumerate(children):
            if isinstance(child, nn.Conv2d):
                assert isinstance(children[index + 1], nn.BatchNorm2d)
    assert model.classifier.in_features == 1280
    assert not modules_of(model, nn.Dropout)


def test_torchvision_mobilenetv2_structure() -> None:
    """The 1.0 / 1.4 models stay torchvision's: ReLU6, no expansion conv in the t = 1 block."""
    model = eval_model("mobilenetv2", 3)
    assert not modules_of(model, nn.ReLU)
    assert modules_of(model, nn.ReLU6)
    convs = modules_of(model.trunk[1][0], nn.Conv2d)
    assert [(conv.in_channels, conv.out_channels) for conv in convs] == [(32, 32), (32, 16)]


@pytest.mark.parametrize("name", [f"vgg{depth}" for depth in (8, 11, 13, 16, 19)])
def test_vgg_convolutions_have_biases(name: str) -> None:
    convs = modules_of(eval_model(name, 3), nn.Conv2d)
    assert convs and all(conv.bias is not None for conv in convs)


SWITOKD_WRNS = ["switokd_wrn_16_1", "switokd_wrn_16_2", "switokd_wrn_16_8"]


@pytest.mark.parametrize("name", SWITOKD_WRNS)
def test_switokd_wrn_convolutions_have_biases_and_the_final_bn_momentum_is_0_9(name: str) -> None:
    model = eval_model(name, 3)
    convs = modules_of(model, nn.Conv2d)
    assert convs and all(conv.bias is not None for conv in convs)
    final_bn = model.head[1]
    assert isinstance(final_bn, nn.BatchNorm2d) and final_bn.momentum == 0.9
    assert isinstance(model.head[2], nn.ReLU)
    others = [bn for bn in modules_of(model, nn.BatchNorm2d) if bn is not final_bn]
    assert others and all(bn.momentum == 0.1 for bn in others)


def test_switokd_wrn_strides_its_second_conv_and_projects_the_raw_input() -> None:
    model = eval_model("switokd_wrn_16_2", 3)
    projecting = [
        module
        for module in model.modules()
        if isinstance(getattr(module, "shortcut", None), nn.Conv2d)
    ]
    # Every stage's first block widens: 16 -> 32 at stride 1, then two strided ones.
    assert len(projecting) == 3
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for index, block in enumerate(projecting):
        first, second = modules_of(block.residual, nn.Conv2d)
        assert first.stride == (1, 1)
        assert second.stride == ((1, 1) if index == 0 else (2, 2))
        handles.append(
            block.register_forward_pre_hook(
                lambda _m, inputs, key=f"in{index}": seen.__setitem__(key, inputs[0].clone())
            )
        )
        handles.append(
            block.shortcut.register_forward_pre_hook(
                lambda _m, inputs, key=f"shortcut{index}": seen.__setitem__(key, inputs[0].clone())
            )
        )
        handles.append(
            first.register_forward_hook(
                lambda _m, inputs, out, key=f"first{index}": seen.__setitem__(key, out.shape)
            )
        )
    try:
        with torch.no_grad():
            model(images(32))
    finally:
        for handle in handles:
            handle.remove()
    for index in range(3):
        block_input, shortcut_input = seen[f"in{index}"], seen[f"shortcut{index}"]
        # The raw input (with negatives), not BN + ReLU of it as in CRD's WRN.
        assert torch.equal(shortcut_input, block_input)
        assert block_input.min() < 0
        # The first conv keeps the resolution; only the second one halves it.
        assert seen[f"first{index}"][2:] == block_input.shape[2:]


def test_crd_wrn_keeps_its_own_block() -> None:
    """The CRD WRN (wrn_16_2) still strides the first conv and projects the pre-activated input."""
    model = eval_model("wrn_16_2", 3)
    strided = model.trunk[2][0]
    first, second = strided.residual[0], strided.residual[2]
    assert first.stride == (2, 2) and second.stride == (1, 1)
    assert all(conv.bias is None for conv in modules_of(model, nn.Conv2d))
    assert all(bn.momentum == 0.1 for bn in modules_of(model, nn.BatchNorm2d))


# Initialisation, as each official file does it. Checked on one freshly built 100-class model.
@functools.cache
def fresh_model(name: str) -> SplitNet:
    torch.manual_seed(0)
    return create(name, 100)


def he_normal_std(conv: nn.Conv2d) -> float:
    return (2.0 / (conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1])) ** 0.5


def largest_conv(model: nn.Module) -> nn.Conv2d:
    return max(modules_of(model, nn.Conv2d), key=lambda conv: conv.weight.numel())


@pytest.mark.parametrize(
    "name", ["MobileNetV2", "mobilenetv2_0.5", "vgg8", "vgg13", "mobilenetv2", "mobilenetv2_1.4"]
)
def test_vgg_and_mobilenetv2_init(name: str) -> None:
    """He (fan-out) convs with zero biases, a N(0, 0.01) classifier with zero bias (CRD's VGG and
    MobileNetV2 files, torchvision's MobileNetV2)."""
    model = fresh_model(name)
    conv = largest_conv(model)
    assert conv.weight.std().item() == pytest.approx(he_normal_std(conv), rel=0.05)
    assert all(conv.bias is None or not conv.bias.any() for conv in modules_of(model, nn.Conv2d))
    assert model.classifier.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert not model.classifier.bias.any()


@pytest.mark.parametrize("name", ["ShuffleV1", "ShuffleV2"])
def test_shufflenets_keep_pytorch_default_init(name: str) -> None:
    """CRD's ShuffleNet files never re-initialise: Kaiming-uniform bounded by 1/sqrt(fan_in)."""
    model = fresh_model(name)
    for module in (largest_conv(model), model.classifier):
        fan_in = module.weight[0].numel()
        bound = fan_in**-0.5
        assert module.weight.abs().max().item() <= bound
        assert module.weight.abs().max().item() > 0.95 * bound
    assert model.classifier.bias.any()


@pytest.mark.parametrize(
    ("name", "zero_bias"), [("resnet8", False), ("ResNet50", False), ("wrn_16_2", True)]
)
def test_crd_resnet_and_wrn_classifier_bias(name: str, zero_bias: bool) -> None:
    """CRD's ResNets leave the fc at PyTorch's default; its WRN zeroes the fc bias."""
    model = fresh_model(name)
    conv = largest_conv(model)
    assert conv.weight.std().item() == pytest.approx(he_normal_std(conv), rel=0.05)
    assert model.classifier.bias.any() != zero_bias
    fan_in = model.classifier.in_features
    assert model.classifier.weight.abs().max().item() <= fan_in**-0.5


def xavier_uniform_bound(conv: nn.Conv2d, gain: float) -> float:
    fan_in = conv.weight[0].numel()
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    return gain * (6.0 / (fan_in + fan_out)) ** 0.5


@pytest.mark.parametrize("name", SWITOKD_WRNS)
def test_switokd_wrn_init(name: str) -> None:
    """xavier_uniform(gain sqrt 2) convs, zero conv biases, a PyTorch-default classifier."""
    model = fresh_model(name)
    for conv in modules_of(model, nn.Conv2d):
        assert conv.weight.abs().max().item() <= xavier_uniform_bound(conv, 2**0.5)
        assert not conv.bias.any()
    conv = largest_conv(model)
    assert conv.weight.abs().max().item() > 0.95 * xavier_uniform_bound(conv, 2**0.5)
    assert model.classifier.bias.any()
    assert model.classifier.weight.abs().max().item() <= model.classifier.in_features**-0.5
