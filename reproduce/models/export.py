"""Export a network trained here so the ecosystem's own code loads it: ``python -m reproduce export RUN_DIR``.

Formats:
- ``crd``: RepDistiller / mdistiller's checkpoint ``{"epoch", "model": state_dict, "accuracy"}`` in their
  files' key names (``model.load_state_dict(torch.load(path)["model"])`` in their code);
- ``torchvision``: a bare state_dict in torchvision's key names (``torchvision.models.resnet18(...)
  .load_state_dict(torch.load(path))``), for the architectures the zoo takes from torchvision;
- ``torchscript``: the compiled network (``torch.jit.load(path)``), for any architecture and any input size.
The first two read back through ``load_pretrained`` to the same logits.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from reproduce.io import atomic_path, atomic_torch_save
from reproduce.models import upstream
from reproduce.models.base import SplitNet
from reproduce.models.pretrained import PretrainedError, load_pretrained, read_checkpoint

FORMATS = ("crd", "torchvision", "torchscript")
SUFFIX = {"crd": ".pth", "torchvision": ".pth", "torchscript": ".pt"}


def export_network(run_dir: Path, fmt: str, *, network: str | None = None, checkpoint: str = "final.pt",
                   out: Path | None = None) -> Path:
    """Write ``network`` (default: the run's student, else its only network) of ``run_dir/checkpoint`` in
    ``fmt``; returns the file (default ``run_dir/export/<network>-<arch>-<fmt><suffix>``)."""
    if fmt not in FORMATS:
        raise PretrainedError(f"--format {fmt}: unknown; choose one of {', '.join(FORMATS)}")
    source = Path(run_dir) / checkpoint
    if not source.is_file():
        raise PretrainedError(f"{source}: no such file; export reads a finished run's final.pt or best.pt "
                              f"(train it to the end first)")
    saved = read_checkpoint(source)
    if not (isinstance(saved, dict) and isinstance(saved.get("networks"), dict)):
        raise PretrainedError(f"{source}: not a run's final.pt / best.pt (no networks in it)")
    networks, recorded = saved["networks"], saved.get("models", {})
    name = network or ("student" if "student" in networks else next(iter(networks)) if len(networks) == 1 else "")
    if name not in networks or name not in recorded:
        raise PretrainedError(f"{source}: choose --network among {', '.join(n for n in networks if n in recorded)}"
                              f" (the networks whose architecture the run recorded)")
    arch = recorded[name]
    num_classes, in_channels = _classes_and_channels(networks[name])
    model = load_pretrained(arch, f"{source}#{name}", num_classes, in_channels).eval()
    target = Path(out) if out else Path(run_dir) / "export" / f"{name}-{arch}-{fmt}{SUFFIX[fmt]}"
    target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torchscript":
        with warnings.catch_warnings():  # torch deprecates TorchScript for torch.export; it is what was asked for
            warnings.simplefilter("ignore", FutureWarning)
            with atomic_path(target) as temporary, temporary.open("wb") as stream:
                torch.jit.save(torch.jit.script(model), stream)
    else:
        atomic_torch_save(_upstream_payload(model, arch, fmt, saved.get("epoch")), target)
    return target


def _upstream_payload(model: SplitNet, arch: str, fmt: str, epoch: int | None) -> dict:
    layout = upstream.upstream_layout(arch)
    if layout != fmt:
        where = f"its official layout is {layout}" if layout else "the zoo knows no official layout for it"
        raise PretrainedError(f"{arch} cannot be exported as {fmt}: {where}; --format torchscript works for any "
                              f"architecture")
    state = {theirs: model.state_dict()[ours] for ours, theirs in upstream.key_map(model, arch).items()}
    if fmt == "torchvision":
        return state
    accuracy = model.source.accuracy if model.source is not None else None
    return {"epoch": epoch, "model": state, "accuracy": accuracy}


def _classes_and_channels(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """The classifier's outputs (the head's last weight) and the stem's input channels (the first conv)."""
    classifier = [value for key, value in state.items() if key.startswith("head.") and key.endswith(".weight")][-1]
    stem = next(value for value in state.values() if value.dim() == 4)
    return classifier.shape[0], stem.shape[1]
