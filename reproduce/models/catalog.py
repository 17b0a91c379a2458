"""The released teacher checkpoints the papers distil from: where they live, what they score, how to fetch them.

Paths are the official code's own (mdistiller's ``download_ckpts/...``), relative to the working directory,
so a checkout that already holds mdistiller's teachers needs no copy. The published top-1 is the number
the release is known by: CRD's teacher table (Tian et al., ICLR 2020, RepDistiller README; mdistiller
ships the same files), torchvision's own weight metadata for its ImageNet weights.
"""

from __future__ import annotations

import hashlib
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from reproduce.errors import UserError
from reproduce.io import atomic_write_text

CHECKPOINT_ROOT = "download_ckpts"
DATASET_CLASSES = {"cifar100": 100, "tinyimagenet": 200}


@dataclass(frozen=True)
class Archive:
    """A release archive of teachers and the folder it is unpacked into (its members' paths start there)."""

    name: str
    url: str
    extract_to: str
    min_bytes: int  # anything smaller is an error page or a truncated download, not the archive


@dataclass(frozen=True)
class KnownTeacher:
    arch: str
    path: str  # mdistiller's location, relative to the working directory
    dataset: str
    published: float | None  # the release's published test top-1 (%), None where none is published
    archive: Archive | None  # the release archive holding it, None where it is only distributed by hand

    @property
    def member(self) -> str:
        return Path(self.path).relative_to(self.archive.extract_to).as_posix() if self.archive else ""


CIFAR_TEACHERS = Archive("cifar_teachers.tar",
                         "https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar",
                         extract_to=CHECKPOINT_ROOT, min_bytes=10_000_000)
# R2KD's Tiny-ImageNet teachers (its pretrained_models.sh): trained by Good-DA-in-KD's authors, CRD's layout.
TINY_TEACHERS = Archive("teachers_tinyimagenet.zip",
                        "https://github.com/MingSun-Tse/Good-DA-in-KD/releases/download/v0.1/teachers_tinyimagenet.zip",
                        extract_to=f"{CHECKPOINT_ROOT}/tiny_teachers", min_bytes=10_000_000)

# CRD's teacher table (CIFAR-100 test top-1, last epoch).
CRD_TEACHER_TOP1 = {"resnet56": 72.34, "resnet110": 74.31, "resnet32x4": 79.42, "wrn_40_2": 75.61, "vgg13": 74.64,
                    "ResNet50": 79.34}

KNOWN_TEACHERS = [
    *(KnownTeacher(arch, f"{CHECKPOINT_ROOT}/cifar_teachers/{arch}_vanilla/ckpt_epoch_240.pth", "cifar100", top1,
                   CIFAR_TEACHERS) for arch, top1 in CRD_TEACHER_TOP1.items()),
    # mdistiller's Tiny-ImageNet teacher (CRD's resnetv2 ResNet18, 200 classes): not in a release archive.
    KnownTeacher("ResNet18", f"{CHECKPOINT_ROOT}/tiny_imagenet_teachers/ResNet18_vanilla/ti_res18", "tinyimagenet",
                 None, None),
    *(KnownTeacher(arch, f"{CHECKPOINT_ROOT}/tiny_teachers/models_tinyimagenet_v2/{arch}_vanilla/ckpt_epoch_240.pth",
                   "tinyimagenet", None, TINY_TEACHERS)
      for arch in ("resnet56", "resnet110", "resnet32x4", "ResNet50", "wrn_40_2", "vgg13")),
]


def known_teacher(path: str | Path) -> KnownTeacher | None:
    """The catalogued release a file is, recognised by its path ending (wherever download_ckpts lives)."""
    text = Path(path).as_posix()
    return next((known for known in KNOWN_TEACHERS
                 if text == known.path or text.endswith("/" + known.path)), None)


def torchvision_published_top1(weights: object) -> float | None:
    """ImageNet-1K top-1 a torchvision ``WeightsEnum`` member documents for itself."""
    metrics = getattr(weights, "meta", {}).get("_metrics", {})
    return metrics.get("ImageNet-1K", {}).get("acc@1")


class TeacherNotFoundError(UserError, FileNotFoundError):
    """A configured teacher checkpoint that is not on disk."""


def missing_teacher_message(path: str | Path) -> str:
    """Where the file comes from and the two ways on: fetch it, or train a teacher instead."""
    known = known_teacher(path)
    if known is not None and known.archive is not None:
        where = (f"it is {known.member} in {known.archive.url}: pass --download to the recipe command, or download "
                 f"the archive and unpack it into {_archive_root(path, known)}/")
    elif known is not None:
        where = f"it is the official {known.arch} teacher ({known.dataset}), distributed by hand: copy it there"
    else:
        where = "put the checkpoint there or point teacher.checkpoint at it"
    return f"teacher checkpoint {path} not found; {where}; or --set teacher.checkpoint=null trains the teacher first"


def ensure_teacher(spec: str, download: bool) -> None:
    """Before a run: the configured teacher file is there, or fetched (``download``), or a clear error saying
    where it comes from. ``torchvision:`` specs are left to torchvision's own download at load time."""
    path = Path(spec.partition("#")[0])
    if spec.startswith("torchvision:") or path.is_file():
        return
    if not download:
        raise TeacherNotFoundError(missing_teacher_message(path))
    fetch_teacher(path)


def fetch_teacher(path: str | Path, progress: bool = True) -> Path:
    """Download the release archive holding the catalogued teacher at ``path`` (where the network allows) and
    unpack it where ``path`` expects it. Refused: a teacher the catalogue has no archive for, a download
    below the archive's minimum size, a member that would land outside the folder, an archive without the
    teacher, or a teacher that does not load into its architecture (a different release). The archive's
    sha256 is printed and kept next to it for the record."""
    import torch.hub

    from reproduce.models.pretrained import load_pretrained

    known = known_teacher(path)
    if known is None or known.archive is None:
        raise TeacherNotFoundError(f"{missing_teacher_message(path)} (no release archive is known for it, so "
                                   f"--download cannot fetch it)")
    archive = known.archive
    root = _archive_root(path, known)
    root.mkdir(parents=True, exist_ok=True)
    downloaded = root / archive.name
    if not downloaded.is_file():
        try:
            torch.hub.download_url_to_file(archive.url, str(downloaded), progress=progress)
        except OSError as error:  # URLError is an OSError: offline, DNS, proxy
            raise TeacherNotFoundError(f"could not download {archive.url} ({error}); {missing_teacher_message(path)}") \
                from None
    size = downloaded.stat().st_size
    if size < archive.min_bytes:
        downloaded.unlink()
        raise UserError(f"{archive.url} gave {size:,} bytes, not the {archive.name} release (at least "
                        f"{archive.min_bytes:,}); deleted it: retry, or download the archive by hand")
    with downloaded.open("rb") as stream:
        digest = hashlib.file_digest(stream, "sha256").hexdigest()
    atomic_write_text(root / f"{archive.name}.sha256", f"{digest}  {archive.name}\n")
    _unpack(downloaded, root, known.member)
    # A teacher that does not load into its architecture is another release: fail here, not mid-run.
    load_pretrained(known.arch, path, num_classes=DATASET_CLASSES[known.dataset])
    print(f"{archive.name}: sha256 {digest}, {size:,} bytes, unpacked into {root}/; {known.arch} teacher at {path}")
    return Path(path)


def _archive_root(path: str | Path, known: KnownTeacher) -> Path:
    """The folder the archive unpacks into so that its member lands at ``path`` (download_ckpts/ by default)."""
    return Path(Path(path).as_posix()[: -len(known.member)] or ".")


def _unpack(downloaded: Path, target: Path, member: str) -> None:
    if downloaded.name.endswith(".zip"):
        with zipfile.ZipFile(downloaded) as bundle:
            _check_members(downloaded, bundle.namelist(), member, target)
            bundle.extractall(target)
    else:
        with tarfile.open(downloaded) as bundle:
            _check_members(downloaded, bundle.getnames(), member, target)
            bundle.extractall(target, filter="data")  # "data": no absolute paths, links out or device files


def _check_members(downloaded: Path, names: list[str], member: str, target: Path) -> None:
    outside = [name for name in names if not (target / name).resolve().is_relative_to(target.resolve())]
    if outside or member not in names:
        problem = f"members outside the folder: {outside[:3]}" if outside else f"no {member}"
        raise UserError(f"{downloaded}: not the expected teacher release ({problem}); delete it and retry")
