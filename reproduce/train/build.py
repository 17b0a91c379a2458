"""How a run gets its networks: fresh ones by architecture, the frozen teacher from its checkpoint.

The teacher offline methods distil from (and SOKD grafts onto, R2KD prunes) is ``teacher.checkpoint`` when
set, a released teacher such as CRD's or torchvision's (reproduce/models/catalog.py), else the ``teacher``
method's own ``runs_root/seed<k>/final.pt``. Either way it loads through ``reproduce.models.load_pretrained``,
and the teacher carries the record of which file it was (``teacher.source``: path, sha256, the test top-1 the
checkpoint records and the published one), which the run writes into metrics.json. ``check_teacher``
evaluates that same teacher on the test split (``python -m reproduce teacher-check``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from reproduce import models
from reproduce.config import Config
from reproduce.data.loader import make_loaders
from reproduce.data.prepare import load_prepared
from reproduce.methods.base import Networks
from reproduce.metrics import classification_metrics
from reproduce.models.catalog import TeacherNotFoundError
from reproduce.models.pretrained import PretrainedSource
from reproduce.runtime import resolve_runtime
from reproduce.train.evaluate import predict

TEACHER_TOLERANCE = 0.5  # top-1 points between a teacher's measured and published accuracy before a warning


def make_networks(config: Config, num_classes: int, in_channels: int, device: torch.device) -> Networks:
    def create(arch: str) -> nn.Module:
        return models.create(arch, num_classes, in_channels=in_channels)

    def load_teacher() -> nn.Module:
        return load_configured_teacher(config, num_classes, in_channels)

    return Networks(config.models.teacher, config.models.student, num_classes, in_channels, create, load_teacher)


def load_configured_teacher(config: Config, num_classes: int, in_channels: int) -> models.SplitNet:
    """The teacher of ``config``, frozen and in eval mode; clear errors for a missing or mismatched file."""
    source = config.teacher.checkpoint
    if not source:
        path = config.teacher.weights
        if not path.exists():
            raise TeacherNotFoundError(
                f"teacher weights not found at {path}. Offline methods distil from the trained teacher: run "
                f"`dvc repro train@teacher` (or `python -m pipeline stage --method teacher`) first, point "
                f"teacher.runs_root at a folder holding seed{config.teacher.seed}/final.pt, or set "
                f"teacher.checkpoint to a pretrained teacher")
        source = f"{path}#teacher"
    teacher = models.load_pretrained(config.models.teacher, source, num_classes, in_channels)
    teacher.requires_grad_(False)
    return teacher.eval()


@dataclass(frozen=True)
class TeacherCheck:
    """The configured teacher measured on the test split, beside the accuracy it is known by."""

    arch: str
    source: PretrainedSource
    images: int
    top1: float
    ece: float  # a fraction

    @property
    def gap(self) -> float | None:
        """Measured minus published top-1 (points); None where nothing is published."""
        return None if self.source.published is None else self.top1 - self.source.published

    @property
    def disagrees(self) -> bool:
        return self.gap is not None and abs(self.gap) > TEACHER_TOLERANCE

    def report(self) -> list[str]:
        recorded = "" if self.source.accuracy is None else f", {self.source.accuracy:.2f} % recorded in the checkpoint"
        published = "not published" if self.source.published is None else f"{self.source.published:.2f} % published"
        lines = [f"teacher {self.arch} from {self.source.spec} ({self.source.layout} layout, sha256 "
                 f"{self.source.sha256[:12]})",
                 f"test top-1 {self.top1:.2f} % (ECE {100 * self.ece:.2f} %) on {self.images} images; {published}"
                 f"{recorded}"]
        if self.disagrees:
            lines.append(f"warning: {self.gap:+.2f} points from the published accuracy (tolerance "
                         f"{TEACHER_TOLERANCE}); the usual cause is the wrong normalisation (dataset.normalization) "
                         f"or split")
        return lines


def check_teacher(config: Config) -> TeacherCheck:
    """Load the teacher exactly as a run would and evaluate it on the prepared test split."""
    runtime = resolve_runtime(config.runtime)
    prepared = load_prepared(config.dataset.prepared_dir)
    _, splits = make_loaders(prepared, config.dataset, batch_size=config.recipe.batch_size,
                             eval_batch_size=config.recipe.eval_batch_size, device=runtime.device, seed=0,
                             channels_last=runtime.channels_last, num_workers=config.runtime.loader_workers)
    teacher = load_configured_teacher(config, prepared.num_classes, prepared.in_channels).to(runtime.device)
    logits, labels = predict({"teacher": teacher}, splits["test"], runtime.amp_dtype, runtime.device)
    metrics = classification_metrics(logits["teacher"], labels)
    return TeacherCheck(config.models.teacher, teacher.source, len(labels), metrics["top1"], metrics["ece"])
