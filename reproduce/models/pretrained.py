"""Pretrained weights: ``load_pretrained`` is the one way the suite turns a checkpoint into a zoo model.

A source is a path or a spec:
- the suite's own ``final.pt`` / ``best.pt`` (``path#role`` picks a network; by default the one whose
  recorded architecture is ``arch``, the teacher first);
- a RepDistiller / CRD / mdistiller checkpoint ``{"epoch", "model": state_dict, "accuracy", "optimizer"}``
  (saved on GPU, loaded to the CPU), or any plain state_dict, in the architecture's upstream key layout
  (reproduce/models/upstream.py) or in the zoo's own names;
- ``torchvision:<WeightsEnum>`` (e.g. ``torchvision:ResNet34_Weights.IMAGENET1K_V1``), through
  torchvision's own download and cache ($TORCH_HOME/hub/checkpoints).
Every tensor is mapped by name and the load is all or nothing: a missing, unexpected or differently shaped
tensor is a ``PretrainedError`` naming the file, the architecture it looks like and the keys that differ.
Files load with ``weights_only=True``; beyond tensors only plain values are accepted, plus the few harmless
types the official checkpoints carry (argparse.Namespace options, numpy scalars).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from reproduce.errors import ConfigError
from reproduce.models import upstream
from reproduce.models.base import SplitNet
from reproduce.models.catalog import TeacherNotFoundError, known_teacher, missing_teacher_message, \
    torchvision_published_top1
from reproduce.models.registry import MODELS, available, create

TORCHVISION = "torchvision:"
SHOWN = 4  # differing keys named in an error; the rest are counted
BATCH_COUNTER = "num_batches_tracked"  # absent from pre-1.0 checkpoints; never used in eval mode


class PretrainedError(ConfigError):
    """A checkpoint that cannot be loaded into the requested architecture."""


@dataclasses.dataclass(frozen=True)
class PretrainedSource:
    """Where a model's weights came from: recorded by every run that distils from them."""

    spec: str  # as configured
    path: str  # the file read
    sha256: str
    layout: str  # suite | native | crd | torchvision
    accuracy: float | None  # the test top-1 (%) the checkpoint records for itself
    published: float | None  # the published test top-1 (%) of these weights

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Weights:
    state: dict[str, Tensor]
    layout: str
    accuracy: float | None = None
    published: float | None = None


def load_pretrained(arch: str, source: str | Path, num_classes: int, in_channels: int = 3) -> SplitNet:
    """``arch`` of the zoo with the weights of ``source``; ``model.source`` records where they came from."""
    MODELS.get(arch)  # an unknown name fails first, with the choices
    spec = str(source)
    if spec.startswith(TORCHVISION):
        path, weights = _torchvision(spec[len(TORCHVISION):])
    else:
        path_text, _, role = spec.partition("#")
        path = Path(path_text)
        if not path.is_file():
            raise TeacherNotFoundError(missing_teacher_message(path))
        weights = _interpret(read_checkpoint(path), path, arch, role)
        known = known_teacher(path)
        if known is not None and known.arch == arch:
            weights.published = known.published
        elif weights.layout == "torchvision":
            weights.published = _torchvision_file_top1(arch, path)
    model = create(arch, num_classes, in_channels)
    _load_state(model, arch, weights, path)
    with path.open("rb") as stream:
        digest = hashlib.file_digest(stream, "sha256").hexdigest()
    model.source = PretrainedSource(spec, str(path), digest, weights.layout, weights.accuracy, weights.published)
    return model


# Plain data the official checkpoints hold besides tensors: RepDistiller's `opt` is an argparse.Namespace,
# some save the accuracy as a numpy scalar or array (under numpy 1's module name or numpy 2's).
def _plain_data_types() -> list[Any]:
    scalar = np.float64(0).__reduce__()[0]
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    dtypes = [type(np.dtype(name)) for name in ("float64", "float32", "float16", "int64", "int32", "bool")]
    return [argparse.Namespace, np.dtype, np.ndarray, *dtypes, scalar, (scalar, "numpy.core.multiarray.scalar"),
            reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct")]


def read_checkpoint(path: Path, what: str = "checkpoint", fix: str = "download it again", *,
                    refused_fix: str = "Re-save its state_dict alone (torch.save(model.state_dict(), ...))",
                    error: type[ConfigError] = PretrainedError) -> Any:
    """The suite's one reader of what ``torch.save`` wrote (weights, checkpoints, predictions): ``torch.load``
    with ``weights_only=True`` onto the CPU. A file that asks for code (a global beyond tensors and plain
    values) is refused with ``refused_fix``; anything else that fails to load is corrupt or not such a file at
    all (random bytes), with ``fix``; both are ``error`` naming ``what`` the file should be."""
    try:
        with torch.serialization.safe_globals(_plain_data_types()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise error(f"{path}: no such {what}; {fix}") from None
    except Exception as failure:  # torch raises many types (UnpicklingError, RuntimeError, KeyError, EOFError)
        detail = _load_failure(failure)
        if _asks_for_code(path, detail):
            raise error(f"{path}: refused to load this {what}: it holds more than tensors and plain values "
                        f"({detail}); files from others are never unpickled as code. {refused_fix}") from None
        raise error(f"{path}: this {what} is corrupt or truncated ({detail}); {fix}") from None


def _load_failure(failure: Exception) -> str:
    """The line that says what went wrong: the weights-only unpickler's own error, not torch's preamble."""
    inner = failure.__context__ if isinstance(failure, pickle.UnpicklingError) and failure.__context__ else failure
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    return f"{type(inner).__name__}: {lines[0] if lines else 'no detail'}"


def _asks_for_code(path: Path, detail: str) -> bool:
    """A pickle (torch's zip archive or its legacy stream) whose load stopped at a global, a function or a
    class; random bytes that happen to decode as such an opcode are not a pickle to begin with."""
    with open(path, "rb") as stream:
        header = stream.read(4)
    pickled = header.startswith(b"PK\x03\x04") or header.startswith(b"\x80")
    return pickled and any(word in detail for word in ("GLOBAL", "function", "allowlisted", "add_safe_globals"))


def _interpret(saved: Any, path: Path, arch: str, role: str) -> _Weights:
    if isinstance(saved, dict) and isinstance(saved.get("networks"), dict) and isinstance(saved.get("models"), dict):
        return _suite_network(saved, path, arch, role)
    if role:
        raise PretrainedError(f"{path}#{role}: only the suite's final.pt / best.pt hold several networks; drop #{role}")
    if isinstance(saved, dict) and isinstance(saved.get("model"), dict):  # RepDistiller / CRD / mdistiller
        state, accuracy = saved["model"], _number(saved.get("accuracy", saved.get("best_acc")))
    elif isinstance(saved, dict) and isinstance(saved.get("state_dict"), dict):
        state, accuracy = saved["state_dict"], None
    else:
        state, accuracy = saved, None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(value) for value in state.values()):
        found = list(saved)[:SHOWN] if isinstance(saved, dict) else type(saved).__name__
        raise PretrainedError(f"{path}: not a checkpoint of weights (found {found}); expected a state_dict, "
                              f"{{'model': state_dict, ...}} (CRD / mdistiller) or the suite's final.pt / best.pt")
    if all(key.startswith("module.") for key in state):  # saved from inside nn.DataParallel
        state = {key[len("module."):]: value for key, value in state.items()}
    if all(key.startswith(("trunk.", "head.")) for key in state):
        return _Weights(state, "native", accuracy)
    layout = upstream.upstream_layout(arch)
    if layout is None:
        raise PretrainedError(f"{path}: the zoo knows no upstream key layout for {arch}; load the suite's own "
                              f"final.pt or a state_dict in the zoo's names")
    return _Weights(state, layout, accuracy)


def _number(value: Any) -> float | None:
    """A recorded accuracy as a float: RepDistiller saves a 0-d tensor, others a numpy or Python number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _suite_network(saved: dict[str, Any], path: Path, arch: str, role: str) -> _Weights:
    networks, recorded = saved["networks"], saved["models"]
    holds = ", ".join(f"{name} ({recorded.get(name, 'unrecorded architecture')})" for name in networks)
    if not role:
        candidates = [name for name in networks if recorded.get(name) == arch]
        role = "teacher" if "teacher" in candidates else (candidates[0] if len(candidates) == 1 else "")
        if not role:
            raise PretrainedError(f"{path} holds {holds}: {'several' if candidates else 'no'} {arch} network"
                                  f"{'s' if candidates else ''}; name one as {path}#<network> or use the architecture "
                                  f"it holds")
    if role not in networks:
        raise PretrainedError(f"{path}#{role}: no such network; it holds {holds}")
    if recorded.get(role, arch) != arch:
        raise PretrainedError(f"{path} holds a {recorded[role]} {role}, not a {arch}; set the architecture to "
                              f"{recorded[role]} or point at a {arch} checkpoint")
    return _Weights(networks[role], "suite", _suite_accuracy(path, role))


def _suite_accuracy(path: Path, network: str) -> float | None:
    """The test top-1 the run's metrics.json reports for the epoch the file holds (last or best)."""
    metrics_file = path.parent / "metrics.json"
    if path.name not in ("final.pt", "best.pt") or not metrics_file.is_file():
        return None
    summary = json.loads(metrics_file.read_text())
    epoch = summary.get("last") if path.name == "final.pt" else summary.get("best", summary.get("best_test_selected"))
    return (epoch or {}).get("test", {}).get(network, {}).get("top1")


def _torchvision(name: str) -> tuple[Path, _Weights]:
    """torchvision's weights through its own download and cache; the file is hash-checked when downloaded."""
    models = importlib.import_module("torchvision.models")
    try:
        weights = models.get_weight(name)
    except (ValueError, AttributeError, KeyError):
        raise PretrainedError(f"{TORCHVISION}{name}: torchvision has no such weights; write them as "
                              f"<WeightsEnum>.<member>, e.g. {TORCHVISION}ResNet34_Weights.IMAGENET1K_V1") from None
    try:
        state = weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except OSError as error:
        raise TeacherNotFoundError(f"{TORCHVISION}{name}: could not download {weights.url} ({error}); where the "
                                   f"network is closed, copy the file into {Path(torch.hub.get_dir()) / 'checkpoints'}") \
            from None
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    return path, _Weights(state, "torchvision", None, torchvision_published_top1(weights))


def _torchvision_file_top1(arch: str, path: Path) -> float | None:
    """The published top-1 of a torchvision weights file, recognised by its released name (resnet34-b627a593.pth)."""
    members = importlib.import_module("torchvision.models").get_model_weights(arch)
    return next((torchvision_published_top1(weights) for weights in members if Path(weights.url).name == path.name),
                None)


def _load_state(model: SplitNet, arch: str, weights: _Weights, path: Path) -> None:
    ours = model.state_dict()
    names = {key: key for key in ours} if weights.layout in ("suite", "native") else upstream.key_map(model, arch)
    wanted = {theirs: key for key, theirs in names.items()}  # their key -> our key
    state = weights.state
    missing = [key for key in wanted if key not in state and not key.endswith(BATCH_COUNTER)]
    unexpected = [key for key in state if key not in wanted]
    reshaped = [f"{key} {list(state[key].shape)} (expected {list(ours[wanted[key]].shape)})"
                for key in wanted if key in state and state[key].shape != ours[wanted[key]].shape]
    if missing or unexpected or reshaped:
        layout = "the zoo's" if weights.layout in ("suite", "native") else f"the {weights.layout}"
        differences = [*(f"missing {key}" for key in missing), *(f"unexpected {key}" for key in unexpected),
                       *(f"shape {item}" for item in reshaped)]
        shown = "; ".join(differences[:SHOWN]) + (f"; and {len(differences) - SHOWN} more" if len(differences) > SHOWN
                                                   else "")
        num_classes, in_channels = model.classifier.out_features, _in_channels(model)
        raise PretrainedError(
            f"{path}: not a {arch} ({num_classes} classes, {in_channels} input channels) in {layout} layout: "
            f"{_looks_like(state, num_classes, in_channels)}; {len(differences)} keys differ: {shown}. Point at a "
            f"{arch} checkpoint or set the architecture to the one the file holds")
    model.load_state_dict({key: state.get(theirs, ours[key]) for key, theirs in names.items()})


def _in_channels(model: SplitNet) -> int:
    return next(module.in_channels for module in model.modules() if isinstance(module, torch.nn.Conv2d))


def _looks_like(state: dict[str, Tensor], num_classes: int, in_channels: int) -> str:
    """The zoo architecture and layout the file's keys and shapes match best."""
    names = {key for key in state if not key.endswith(BATCH_COUNTER)}
    scored = []
    for arch in available():
        for layout, expected in _expected_shapes(arch, num_classes, in_channels).items():
            expected_names = {key for key in expected if not key.endswith(BATCH_COUNTER)}
            same_shape = sum(tuple(state[key].shape) == expected[key] for key in names & expected_names)
            scored.append((names == expected_names, same_shape, len(names & expected_names) /
                           len(names | expected_names), arch, layout))
    same_names, same_shape, shared, arch, layout = max(scored)
    described = f"a {layout} {arch}" if layout != "native" else f"a {arch} in the zoo's names"
    if same_names and same_shape == len(names):
        return f"it holds {described}"
    if same_names:
        return f"it looks like {described} of other sizes ({len(names) - same_shape} tensors shaped differently)"
    return f"it matches no architecture of the zoo (closest: {described}, {shared:.0%} of the keys shared)"


class _ShapesOnly(TorchFunctionMode):
    """Builds a model for its shapes: on the meta device, with the in-place initialisers (normal_, zero_, ...)
    skipped, which the meta device would otherwise run through slow reference kernels (~0.2 s a model)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and args and torch.is_tensor(args[0]):
            return args[0]
        return func(*args, **(kwargs or {}))


@functools.cache
def _expected_shapes(arch: str, num_classes: int, in_channels: int) -> dict[str, dict[str, tuple[int, ...]]]:
    """Each layout's key -> shape of ``arch``."""
    with torch.device("meta"), _ShapesOnly():
        model = create(arch, num_classes, in_channels)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    layouts = {"native": shapes}
    if upstream.upstream_layout(arch) is not None:
        layouts[upstream.upstream_layout(arch)] = {theirs: shapes[key]
                                                   for key, theirs in upstream.key_map(model, arch).items()}
    return layouts
