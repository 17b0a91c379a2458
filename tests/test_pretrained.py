"""load_pretrained on checkpoints written in the official files' own key names and shapes.

The upstream names below are written from the official definitions (HobbitLong/RepDistiller models/,
the same in megvii-research/mdistiller mdistiller/models/cifar/; mdistiller's imagenet/mobilenetv1.py;
torchvision itself), independently of reproduce/models/upstream.py: a wrong mapping there fails here.
Each checkpoint holds random tensors, so a tensor that lands in the wrong module changes the logits,
which are compared with a forward pass computed by hand from the upstream names.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from reproduce.errors import UserError
from reproduce.models import SplitNet, create, load_pretrained
from reproduce.models.pretrained import PretrainedError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
Shapes = dict[str, tuple[int, ...]]


# ------------------------------------------------------------------------------------------------
# Upstream key names and shapes, from the official files


def conv(name: str, out: int, inp: int, kernel: int, bias: bool = False) -> Shapes:
    return {f"{name}.weight": (out, inp, kernel, kernel), **({f"{name}.bias": (out,)} if bias else {})}


def bn(name: str, channels: int) -> Shapes:
    return {f"{name}.{leaf}": (channels,) for leaf in ("weight", "bias", "running_mean", "running_var")} | \
        {f"{name}.num_batches_tracked": ()}


def linear(name: str, out: int, inp: int) -> Shapes:
    return {f"{name}.weight": (out, inp), f"{name}.bias": (out,)}


def basic_resnet(stem: int, stages: list[tuple[int, int, int]], shortcut: str, classifier: str, classes: int) -> Shapes:
    """BasicBlock ResNets: conv1/bn1 stem, layer<k>.<i>.{conv1, bn1, conv2, bn2}, a projecting shortcut where
    the stride or the width changes; ``stages`` lists (planes, stride, blocks)."""
    shapes, inplanes = {**conv("conv1", stem, 3, 3), **bn("bn1", stem)}, stem
    for stage, (planes, stride, blocks) in enumerate(stages, start=1):
        for index in range(blocks):
            name = f"layer{stage}.{index}"
            shapes |= conv(f"{name}.conv1", planes, inplanes, 3) | bn(f"{name}.bn1", planes)
            shapes |= conv(f"{name}.conv2", planes, planes, 3) | bn(f"{name}.bn2", planes)
            if index == 0 and (stride != 1 or inplanes != planes):
                shapes |= conv(f"{name}.{shortcut}.0", planes, inplanes, 1) | bn(f"{name}.{shortcut}.1", planes)
            inplanes = planes
    return shapes | linear(classifier, classes, inplanes)


def crd_resnet(depth: int, filters: list[int], classes: int) -> Shapes:
    """resnet.py: ResNet(depth, num_filters, 'basicblock'): the shortcut is `downsample`, the classifier `fc`."""
    blocks = (depth - 2) // 6
    return basic_resnet(filters[0], [(filters[1], 1, blocks), (filters[2], 2, blocks), (filters[3], 2, blocks)],
                        "downsample", "fc", classes)


def crd_resnet18(classes: int) -> Shapes:
    """resnetv2.py ResNet18: BasicBlock [2, 2, 2, 2] from a 64-channel stem; `shortcut` and `linear`."""
    return basic_resnet(64, [(64, 1, 2), (128, 2, 2), (256, 2, 2), (512, 2, 2)], "shortcut", "linear", classes)


def crd_wrn(depth: int, widen: int, classes: int) -> Shapes:
    """wrn.py: conv1, block<k>.layer.<i>.{bn1, conv1, bn2, conv2[, convShortcut when in != out]}, bn1, fc."""
    widths, blocks = [16, 16 * widen, 32 * widen, 64 * widen], (depth - 4) // 6
    shapes = conv("conv1", 16, 3, 3)
    for stage in range(1, 4):
        for index in range(blocks):
            inp, out, name = widths[stage - 1] if index == 0 else widths[stage], widths[stage], f"block{stage}.layer.{index}"
            shapes |= bn(f"{name}.bn1", inp) | conv(f"{name}.conv1", out, inp, 3) | bn(f"{name}.bn2", out)
            shapes |= conv(f"{name}.conv2", out, out, 3) | (conv(f"{name}.convShortcut", out, inp, 1) if inp != out else {})
    return shapes | bn("bn1", widths[3]) | linear("fc", classes, widths[3])


def crd_vgg8(classes: int) -> Shapes:
    """vgg.py vgg8_bn (cfg "S"): block<j>.0 a biased conv, block<j>.1 its BN; classifier."""
    shapes, inp = {}, 3
    for block, width in enumerate((64, 128, 256, 512, 512)):
        shapes |= conv(f"block{block}.0", width, inp, 3, bias=True) | bn(f"block{block}.1", width)
        inp = width
    return shapes | linear("classifier", classes, 512)


MOBILE_HALF = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def crd_mobile_half(classes: int) -> Shapes:
    """mobilenetv2.py mobile_half: conv1, blocks.<s>.<i>.conv.{0,1 pw; 3,4 dw; 6,7 pw-linear}, conv2, classifier.0."""
    shapes, inp = conv("conv1.0", 16, 3, 3) | bn("conv1.1", 16), 16
    for stage, (t, c, n, _) in enumerate(MOBILE_HALF):
        for index in range(n):
            name, out, hidden = f"blocks.{stage}.{index}.conv", c // 2, inp * t
            shapes |= conv(f"{name}.0", hidden, inp, 1) | bn(f"{name}.1", hidden)
            shapes |= conv(f"{name}.3", hidden, 1, 3) | bn(f"{name}.4", hidden)
            shapes |= conv(f"{name}.6", out, hidden, 1) | bn(f"{name}.7", out)
            inp = out
    return shapes | conv("conv2.0", 1280, inp, 1) | bn("conv2.1", 1280) | linear("classifier.0", classes, 1280)


def crd_shufflev1(classes: int) -> Shapes:
    """ShuffleNetv1.py ShuffleV1 (groups 3): a strided first unit per stage concatenates its shortcut."""
    shapes, inp = conv("conv1", 24, 3, 1) | bn("bn1", 24), 24
    for stage, (out, units) in enumerate(((240, 4), (480, 8), (960, 4)), start=1):
        for index in range(units):
            name, branch = f"layer{stage}.{index}", out - inp if index == 0 else out
            mid, groups = branch // 4, 1 if inp == 24 else 3
            shapes |= conv(f"{name}.conv1", mid, inp // groups, 1) | bn(f"{name}.bn1", mid)
            shapes |= conv(f"{name}.conv2", mid, 1, 3) | bn(f"{name}.bn2", mid)
            shapes |= conv(f"{name}.conv3", branch, mid // 3, 1) | bn(f"{name}.bn3", branch)
            inp = out
    return shapes | linear("linear", classes, 960)


def crd_shufflev2(classes: int) -> Shapes:
    """ShuffleNetv2.py ShuffleV2 (net_size 1): a DownBlock, then BasicBlocks on half the channels; conv2/bn2."""
    shapes, inp = conv("conv1", 24, 3, 1) | bn("bn1", 24), 24
    for stage, (out, units) in enumerate(((116, 3), (232, 7), (464, 3)), start=1):
        down, mid = f"layer{stage}.0", out // 2
        shapes |= conv(f"{down}.conv1", inp, 1, 3) | bn(f"{down}.bn1", inp) | conv(f"{down}.conv2", mid, inp, 1)
        shapes |= bn(f"{down}.bn2", mid) | conv(f"{down}.conv3", mid, inp, 1) | bn(f"{down}.bn3", mid)
        shapes |= conv(f"{down}.conv4", mid, 1, 3) | bn(f"{down}.bn4", mid) | conv(f"{down}.conv5", mid, mid, 1)
        shapes |= bn(f"{down}.bn5", mid)
        for index in range(1, units + 1):
            name = f"layer{stage}.{index}"
            shapes |= conv(f"{name}.conv1", mid, mid, 1) | bn(f"{name}.bn1", mid) | conv(f"{name}.conv2", mid, 1, 3)
            shapes |= bn(f"{name}.bn2", mid) | conv(f"{name}.conv3", mid, mid, 1) | bn(f"{name}.bn3", mid)
        inp = out
    return shapes | conv("conv2", 1024, 464, 1) | bn("bn2", 1024) | linear("linear", classes, 1024)


MOBILENET_V1 = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
                *[(512, 512, 1)] * 5, (512, 1024, 2), (1024, 1024, 1)]


def mdistiller_mobilenetv1(classes: int) -> Shapes:
    """imagenet/mobilenetv1.py: model.0 = conv_bn(3, 32, 2); model.k = conv_dw (0,1 dw; 3,4 pw); fc."""
    shapes = conv("model.0.0", 32, 3, 3) | bn("model.0.1", 32)
    for index, (inp, out, _) in enumerate(MOBILENET_V1, start=1):
        shapes |= conv(f"model.{index}.0", inp, 1, 3) | bn(f"model.{index}.1", inp)
        shapes |= conv(f"model.{index}.3", out, inp, 1) | bn(f"model.{index}.4", out)
    return shapes | linear("fc", classes, 1024)


def random_state(shapes: Shapes, seed: int = 0) -> dict[str, Tensor]:
    """Distinct random values everywhere (positive running variances), distinct batch counters."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for index, (key, shape) in enumerate(shapes.items()):
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(index + 1)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.2
    return state


def crd_checkpoint(path: Path, state: dict[str, Tensor], accuracy: object = None) -> Path:
    """The file RepDistiller's train_teacher.py writes every save_freq epochs (ckpt_epoch_240.pth): its model
    trained with .cuda(), so every tensor, the accuracy included, is stored as a cuda:0 tensor."""
    with mock.patch("torch.serialization.location_tag", lambda storage: "cuda:0"):
        torch.save({"epoch": 240, "model": state, "accuracy": torch.tensor(79.42) if accuracy is None else accuracy,
                    "optimizer": {"state": {}, "param_groups": [{"lr": 0.0005, "momentum": 0.9, "params": [0, 1]}]}},
                   path)
    return path


# ------------------------------------------------------------------------------------------------
# Forward passes computed by hand from the upstream names


def cv(x: Tensor, s: dict[str, Tensor], name: str, stride: int = 1, groups: int = 1) -> Tensor:
    weight = s[f"{name}.weight"]
    return F.conv2d(x, weight, s.get(f"{name}.bias"), stride, weight.shape[-1] // 2, groups=groups)


def bnorm(x: Tensor, s: dict[str, Tensor], name: str) -> Tensor:
    return F.batch_norm(x, s[f"{name}.running_mean"], s[f"{name}.running_var"], s[f"{name}.weight"],
                        s[f"{name}.bias"], training=False, eps=1e-5)


def classify(x: Tensor, s: dict[str, Tensor], name: str) -> Tensor:
    return F.linear(x.mean(dim=(2, 3)), s[f"{name}.weight"], s[f"{name}.bias"])


def resnet_by_hand(s: dict[str, Tensor], x: Tensor, shortcut: str, classifier: str) -> Tensor:
    """resnet.py / resnetv2.py BasicBlock nets: relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))."""
    out = F.relu(bnorm(cv(x, s, "conv1"), s, "bn1"))
    stage = 1
    while f"layer{stage}.0.conv1.weight" in s:
        index = 0
        while f"layer{stage}.{index}.conv1.weight" in s:
            name, stride = f"layer{stage}.{index}", 2 if stage > 1 and index == 0 else 1
            y = F.relu(bnorm(cv(out, s, f"{name}.conv1", stride), s, f"{name}.bn1"))
            y = bnorm(cv(y, s, f"{name}.conv2"), s, f"{name}.bn2")
            if f"{name}.{shortcut}.0.weight" in s:
                out = bnorm(cv(out, s, f"{name}.{shortcut}.0", stride), s, f"{name}.{shortcut}.1")
            out = F.relu(y + out)
            index += 1
        stage += 1
    return classify(out, s, classifier)


def wrn_by_hand(s: dict[str, Tensor], x: Tensor) -> Tensor:
    """wrn.py: a widening block pre-activates its input for both paths, an equal block only for the residual."""
    out = cv(x, s, "conv1")
    for stage in range(1, 4):
        index = 0
        while f"block{stage}.layer.{index}.bn1.weight" in s:
            name, stride = f"block{stage}.layer.{index}", 2 if stage > 1 and index == 0 else 1
            activated = F.relu(bnorm(out, s, f"{name}.bn1"))
            y = cv(F.relu(bnorm(cv(activated, s, f"{name}.conv1", stride), s, f"{name}.bn2")), s, f"{name}.conv2")
            identity = cv(activated, s, f"{name}.convShortcut", stride) if f"{name}.convShortcut.weight" in s else out
            out = y + identity
            index += 1
    return classify(F.relu(bnorm(out, s, "bn1")), s, "fc")


def vgg8_by_hand(s: dict[str, Tensor], x: Tensor) -> Tensor:
    """vgg.py at 32x32: pool0-2 after blocks 0-2 (pool3 only for 64x64 inputs), global average pooling."""
    for block in range(5):
        x = F.relu(bnorm(cv(x, s, f"block{block}.0"), s, f"block{block}.1"))
        x = F.max_pool2d(x, 2) if block < 3 else x
    return classify(x, s, "classifier")


def mobilenetv1_by_hand(s: dict[str, Tensor], x: Tensor) -> Tensor:
    x = F.relu(bnorm(cv(x, s, "model.0.0", 2), s, "model.0.1"))
    for index, (inp, _, stride) in enumerate(MOBILENET_V1, start=1):
        x = F.relu(bnorm(cv(x, s, f"model.{index}.0", stride, groups=inp), s, f"model.{index}.1"))
        x = F.relu(bnorm(cv(x, s, f"model.{index}.3"), s, f"model.{index}.4"))
    return classify(x, s, "fc")


def shuffle(x: Tensor, groups: int) -> Tensor:
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


# Single units: (our module that plays the unit, the unit's forward by hand).
def mobile_half_block(s: dict[str, Tensor], x: Tensor) -> Tensor:
    """blocks.1.1 (stride 1, 24 -> 24 at width 0.5: 12 -> 12): x + pw-linear(dw(pw(x)))."""
    name = "blocks.1.1.conv"
    y = F.relu(bnorm(cv(x, s, f"{name}.0"), s, f"{name}.1"))
    y = F.relu(bnorm(cv(y, s, f"{name}.3", groups=y.shape[1]), s, f"{name}.4"))
    return x + bnorm(cv(y, s, f"{name}.6"), s, f"{name}.7")


def shufflev1_strided_unit(s: dict[str, Tensor], x: Tensor) -> Tensor:
    """layer2.0: grouped conv1 (3 groups), shuffle, strided depthwise conv2 + ReLU, grouped conv3; concat pooled x."""
    name = "layer2.0"
    y = shuffle(F.relu(bnorm(cv(x, s, f"{name}.conv1", groups=3), s, f"{name}.bn1")), 3)
    y = F.relu(bnorm(cv(y, s, f"{name}.conv2", 2, groups=y.shape[1]), s, f"{name}.bn2"))
    y = bnorm(cv(y, s, f"{name}.conv3", groups=3), s, f"{name}.bn3")
    return F.relu(torch.cat([y, F.avg_pool2d(x, 3, 2, 1)], dim=1))


def shufflev2_down_unit(s: dict[str, Tensor], x: Tensor) -> Tensor:
    """layer2.0: left = bn2(conv2(bn1(dw conv1))) + ReLU, right = conv3 ... conv5; concat and shuffle."""
    name, channels = "layer2.0", x.shape[1]
    left = F.relu(bnorm(cv(bnorm(cv(x, s, f"{name}.conv1", 2, groups=channels), s, f"{name}.bn1"), s,
                           f"{name}.conv2"), s, f"{name}.bn2"))
    right = F.relu(bnorm(cv(x, s, f"{name}.conv3"), s, f"{name}.bn3"))
    right = bnorm(cv(right, s, f"{name}.conv4", 2, groups=right.shape[1]), s, f"{name}.bn4")
    right = F.relu(bnorm(cv(right, s, f"{name}.conv5"), s, f"{name}.bn5"))
    return shuffle(torch.cat([left, right], dim=1), 2)


def shufflev2_unit(s: dict[str, Tensor], x: Tensor) -> Tensor:
    """layer2.1: the first half passes, the second goes through conv1/bn1/ReLU, dw conv2/bn2, conv3/bn3/ReLU."""
    name = "layer2.1"
    kept, moved = x[:, : x.shape[1] // 2], x[:, x.shape[1] // 2:]
    y = F.relu(bnorm(cv(moved, s, f"{name}.conv1"), s, f"{name}.bn1"))
    y = bnorm(cv(y, s, f"{name}.conv2", groups=y.shape[1]), s, f"{name}.bn2")
    y = F.relu(bnorm(cv(y, s, f"{name}.conv3"), s, f"{name}.bn3"))
    return shuffle(torch.cat([kept, y], dim=1), 2)


CLASSES = 10
# arch, upstream names and shapes, whole network by hand (or None), [(our unit, the unit by hand)]
LAYOUTS: list[tuple[str, Callable[[int], Shapes], Callable | None,
                    list[tuple[Callable[[SplitNet], torch.nn.Module], Callable]]]] = [
    ("resnet8", lambda c: crd_resnet(8, [16, 16, 32, 64], c), lambda s, x: resnet_by_hand(s, x, "downsample", "fc"), []),
    ("resnet20", lambda c: crd_resnet(20, [16, 16, 32, 64], c),
     lambda s, x: resnet_by_hand(s, x, "downsample", "fc"), []),
    ("resnet8x4", lambda c: crd_resnet(8, [32, 64, 128, 256], c),
     lambda s, x: resnet_by_hand(s, x, "downsample", "fc"), []),
    ("ResNet18", crd_resnet18, lambda s, x: resnet_by_hand(s, x, "shortcut", "linear"), []),
    ("wrn_16_2", lambda c: crd_wrn(16, 2, c), wrn_by_hand, []),
    ("vgg8", crd_vgg8, vgg8_by_hand, []),
    ("MobileNetV1", mdistiller_mobilenetv1, mobilenetv1_by_hand, []),
    ("MobileNetV2", crd_mobile_half, None, [(lambda m: m.trunk[2][1], mobile_half_block)]),
    ("ShuffleV1", crd_shufflev1, None, [(lambda m: m.trunk[3][0], shufflev1_strided_unit)]),
    ("ShuffleV2", crd_shufflev2, None, [(lambda m: m.trunk[3][0], shufflev2_down_unit),
                                        (lambda m: m.trunk[3][1], shufflev2_unit)]),
]


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def fingerprint(tensor: Tensor) -> str:
    return hashlib.sha256(str(tuple(tensor.shape)).encode() + tensor.numpy().tobytes()).hexdigest()


@pytest.mark.parametrize(("arch", "shapes", "by_hand", "units"), LAYOUTS, ids=[row[0] for row in LAYOUTS])
def test_every_upstream_tensor_lands_where_the_official_forward_uses_it(
        tmp_path: Path, images: Tensor, arch: str, shapes: Callable, by_hand: Callable | None, units: list) -> None:
    state = random_state(shapes(CLASSES))
    model = load_pretrained(arch, crd_checkpoint(tmp_path / "ckpt_epoch_240.pth", state), CLASSES).eval()
    # Nothing left over, nothing missing: the upstream tensors and ours are the same set, one for one.
    ours = {fingerprint(value): key for key, value in model.state_dict().items()}
    assert len(ours) == len(state) == len(model.state_dict())
    assert {fingerprint(value) for value in state.values()} == set(ours)
    assert model.source.layout == "crd" and model.source.accuracy == pytest.approx(79.42)
    with torch.no_grad():
        if by_hand is not None:
            torch.testing.assert_close(model(images), by_hand(state, images), rtol=1e-4, atol=1e-5)
        for unit_of, unit_by_hand in units:
            seen: dict[str, Tensor] = {}
            handle = unit_of(model).register_forward_hook(
                lambda _module, inputs, output: seen.update(x=inputs[0].clone(), y=output.clone()))
            model(images)
            handle.remove()
            torch.testing.assert_close(seen["y"], unit_by_hand(state, seen["x"]), rtol=1e-4, atol=1e-5)
        # The classifier is the one the official forward ends with.
        classifier = next(key for key in state if key.endswith("weight") and len(shapes(CLASSES)[key]) == 2)
        assert torch.equal(model.classifier.weight, state[classifier])


def test_the_stem_and_a_shortcut_keep_their_batchnorm_statistics(tmp_path: Path) -> None:
    state = random_state(crd_resnet(8, [32, 64, 128, 256], CLASSES))
    path = crd_checkpoint(tmp_path / "ckpt.pth", state)
    if not torch.cuda.is_available():  # the file really is a GPU one: only a load mapped to the CPU reads it here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    model = load_pretrained("resnet8x4", path, CLASSES)
    stem_bn, shortcut = model.trunk[0][1], model.trunk[2][0].shortcut
    assert torch.equal(stem_bn.running_mean, state["bn1.running_mean"])
    assert torch.equal(stem_bn.running_var, state["bn1.running_var"])
    assert torch.equal(shortcut[0].weight, state["layer1.0.downsample.0.weight"])
    assert torch.equal(shortcut[1].running_var, state["layer1.0.downsample.1.running_var"])
    assert int(shortcut[1].num_batches_tracked) == int(state["layer1.0.downsample.1.num_batches_tracked"])


def torchvision_file(tmp_path: Path, arch: str, classes: int, name: str | None = None) -> tuple[Path, torch.nn.Module]:
    import torchvision

    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)(weights=None, num_classes=classes).eval()
    for module in reference.modules():  # trained-looking BN statistics, so a misplaced one shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / (name or f"{arch}.pth")
    torch.save(reference.state_dict(), path)
    return path, reference


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("resnet34", marks=pytest.mark.slow),
                                  pytest.param("resnet50", marks=pytest.mark.slow)])
def test_a_torchvision_state_dict_gives_torchvision_s_logits(tmp_path: Path, images: Tensor, arch: str) -> None:
    path, reference = torchvision_file(tmp_path, arch, CLASSES)
    model = load_pretrained(arch, path, CLASSES).eval()
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))
    assert model.source.layout == "torchvision" and model.source.published is None


def test_a_torchvision_release_file_carries_its_published_accuracy(tmp_path: Path) -> None:
    path, _ = torchvision_file(tmp_path, "resnet18", 1000, name="resnet18-f37072fd.pth")
    assert load_pretrained("resnet18", path, 1000).source.published == pytest.approx(69.758)


def test_torchvision_weights_come_through_torchvision_s_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               images: Tensor) -> None:
    """`torchvision:<WeightsEnum>` reads $TORCH_HOME/hub/checkpoints like torchvision itself (no network here)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    cache = tmp_path / "torch-home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    path, reference = torchvision_file(cache, "resnet18", 1000, name="resnet18-f37072fd.pth")
    model = load_pretrained("resnet18", "torchvision:ResNet18_Weights.IMAGENET1K_V1", 1000).eval()
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))
    assert model.source.path == str(path) and model.source.published == pytest.approx(69.758)
    assert model.source.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(PretrainedError, match="torchvision has no such weights"):
        load_pretrained("resnet18", "torchvision:ResNet18_Weights.NOPE", 1000)


def test_the_suite_s_own_final_pt_and_a_state_dict_in_the_zoo_s_names(tmp_path: Path, images: Tensor) -> None:
    torch.manual_seed(0)
    teacher, student = create("resnet20", CLASSES).eval(), create("resnet8", CLASSES).eval()
    run = tmp_path / "runs" / "kd" / "seed0"
    run.mkdir(parents=True)
    torch.save({"epoch": 3, "models": {"teacher": "resnet20", "student": "resnet8"},
                "networks": {"student": student.state_dict(), "teacher": teacher.state_dict()}}, run / "final.pt")
    (run / "metrics.json").write_text('{"last": {"test": {"student": {"top1": 61.5}}}}')
    loaded = load_pretrained("resnet8", run / "final.pt", CLASSES).eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), student(images))
    assert (loaded.source.layout, loaded.source.accuracy) == ("suite", 61.5)
    assert load_pretrained("resnet20", f"{run / 'final.pt'}#teacher", CLASSES).source.accuracy is None
    torch.save(student.state_dict(), tmp_path / "native.pt")
    assert load_pretrained("resnet8", tmp_path / "native.pt", CLASSES).source.layout == "native"
    with pytest.raises(PretrainedError, match=r"holds a resnet8 student, not a resnet20"):
        load_pretrained("resnet20", f"{run / 'final.pt'}#student", CLASSES)
    with pytest.raises(PretrainedError, match=r"no resnet32 network"):
        load_pretrained("resnet32", run / "final.pt", CLASSES)


# ------------------------------------------------------------------------------------------------
# Refusals: one line naming the file, what it looks like and the keys that differ


def test_a_checkpoint_of_another_architecture_names_what_it_holds(tmp_path: Path) -> None:
    path = crd_checkpoint(tmp_path / "ckpt_epoch_240.pth", random_state(crd_resnet(8, [32, 64, 128, 256], 100)))
    with pytest.raises(PretrainedError) as error:
        load_pretrained("resnet32x4", path, 100)
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, UserError)
    assert message.startswith(f"{path}: not a resnet32x4 (100 classes, 3 input channels) in the crd layout")
    assert "it holds a crd resnet8x4" in message
    assert "120 keys differ: missing layer1.1.conv1.weight;" in message and "and 116 more" in message


def test_a_wrong_class_count_or_a_partial_file_is_refused(tmp_path: Path) -> None:
    state = random_state(crd_resnet(8, [16, 16, 32, 64], 100))
    with pytest.raises(PretrainedError, match=r"shape fc\.weight \[100, 64\] \(expected \[10, 64\]\)"):
        load_pretrained("resnet8", crd_checkpoint(tmp_path / "a.pth", state), 10)
    partial = {key: value for key, value in state.items() if key != "layer2.0.bn2.running_var"}
    with pytest.raises(PretrainedError, match=r"1 keys differ: missing layer2\.0\.bn2\.running_var\."):
        load_pretrained("resnet8", crd_checkpoint(tmp_path / "b.pth", partial), 100)
    extra = {**state, "layer3.0.conv3.weight": torch.zeros(1)}
    with pytest.raises(PretrainedError, match=r"unexpected layer3\.0\.conv3\.weight"):
        load_pretrained("resnet8", crd_checkpoint(tmp_path / "c.pth", extra), 100)


def test_a_torchvision_file_loaded_as_another_resnet(tmp_path: Path) -> None:
    path, _ = torchvision_file(tmp_path, "resnet18", CLASSES)
    with pytest.raises(PretrainedError, match="it holds a torchvision resnet18"):
        load_pretrained("ResNet18", path, CLASSES)


def test_what_the_official_files_carry_loads_and_code_is_refused(tmp_path: Path) -> None:
    state = random_state(crd_resnet(8, [16, 16, 32, 64], CLASSES))
    # RepDistiller's <model>_last.pth: its options as an argparse.Namespace; an accuracy as a numpy scalar;
    # a model saved from inside nn.DataParallel.
    torch.save({"opt": argparse.Namespace(model="resnet8", learning_rate=0.05), "model": state,
                "optimizer": {}}, tmp_path / "resnet8_last.pth")
    assert load_pretrained("resnet8", tmp_path / "resnet8_last.pth", CLASSES).source.accuracy is None
    wrapped = {f"module.{key}": value for key, value in state.items()}
    path = crd_checkpoint(tmp_path / "wrapped.pth", wrapped, accuracy=np.float64(70.25))
    assert load_pretrained("resnet8", path, CLASSES).source.accuracy == 70.25
    torch.save({"model": state, "hook": Path("x")}, tmp_path / "code.pth")
    with pytest.raises(PretrainedError, match="refused to load this checkpoint: it holds more than tensors"):
        load_pretrained("resnet8", tmp_path / "code.pth", CLASSES)
    (tmp_path / "broken.pth").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(PretrainedError, match=r"this checkpoint is corrupt or truncated \(.*\); download it again$"):
        load_pretrained("resnet8", tmp_path / "broken.pth", CLASSES)
    with pytest.raises(PretrainedError, match="no upstream key layout for switokd_wrn_16_1"):
        load_pretrained("switokd_wrn_16_1", path, CLASSES)
    with pytest.raises(FileNotFoundError, match=r"--set teacher\.checkpoint=null trains the teacher first"):
        load_pretrained("resnet8", tmp_path / "absent.pth", CLASSES)
