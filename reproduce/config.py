"""Typed configuration: ``params.yaml`` plus ``--set key=value`` overrides, validated up front.

Every error names the offending key by its dotted path (``recipe.optimizer.lr``) and says how to fix
it, so a typo fails in the first second of a run instead of after an hour of training.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


from reproduce.errors import ConfigError  # noqa: E402,F401  (re-exported: the config's own error)


@dataclass
class AugmentConfig:
    crop_padding: int = 4  # random crop back to the input size after zero-padding by this many pixels
    flip: bool = True  # random horizontal flip (off for digits: a mirrored 3 is not a 3)
    padding_mode: str = "zeros"  # zeros | reflect (SOKD's loader)

    def validate(self) -> None:
        _at_least(self.crop_padding, 0, "dataset.augment.crop_padding")
        check_choice(self.padding_mode, ("zeros", "reflect"), "dataset.augment.padding_mode")


@dataclass
class DatasetConfig:
    name: str = "digits"
    raw_root: str = "data/raw"
    prepared_root: str = "data/prepared"
    val_fraction: float = 0.15  # carved from the training set; sweeps and best-epoch selection use it
    split_seed: int = 0
    download: bool = False
    verify_md5: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    image_size: int = 224  # only for "files" (ImageNet-scale) storage
    # Per-channel normalisation: "dataset" (the prepared training split's statistics) or the fixed
    # statistics an official code hard-codes: cifar10 | cifar100 | imagenet.
    normalization: str = "dataset"
    gpu_decode: bool = False  # ImageNet streaming: decode the JPEGs on the GPU (nvjpeg) instead of in workers

    def validate(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"dataset.val_fraction: must be in [0, 1) (0 = no validation split, the papers' "
                              f"protocol), got {self.val_fraction}")
        check_choice(self.normalization, ("dataset", "cifar10", "cifar100", "imagenet"), "dataset.normalization")
        _at_least(self.image_size, 1, "dataset.image_size")

    @property
    def prepared_dir(self) -> Path:
        return Path(self.prepared_root) / self.name


@dataclass
class ModelsConfig:
    teacher: str = "resnet32x4"
    student: str = "resnet8x4"


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False

    def validate(self, where: str = "recipe.optimizer") -> None:
        check_choice(self.name, ("sgd", "adamw"), f"{where}.name")
        _positive(self.lr, f"{where}.lr")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"{where}.momentum: must be in [0, 1), got {self.momentum}")
        _at_least(self.weight_decay, 0, f"{where}.weight_decay")


@dataclass
class ScheduleConfig:
    name: str = "step"  # "step" (×gamma at each milestone epoch) or "cosine"
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = 0.1
    warmup_epochs: float = 0.0  # linear warm-up from 0, per iteration

    def validate(self) -> None:
        check_choice(self.name, ("step", "cosine"), "recipe.schedule.name")
        _positive(self.gamma, "recipe.schedule.gamma")
        _at_least(self.warmup_epochs, 0, "recipe.schedule.warmup_epochs")
        for index, milestone in enumerate(self.milestones):
            _at_least(milestone, 1, f"recipe.schedule.milestones[{index}]")


@dataclass
class RecipeConfig:
    epochs: int = 240
    batch_size: int = 64
    eval_batch_size: int = 512
    eval_every: int = 1  # evaluate every this many epochs (always also after the last one)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # Per-role optimiser overrides, e.g. {teacher: {lr: 0.1}} for SwitOKD.
    roles: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self) -> None:
        for key in ("epochs", "batch_size", "eval_batch_size", "eval_every"):
            _at_least(getattr(self, key), 1, f"recipe.{key}")
        self.optimizer.validate()
        for role in self.roles:
            self.optimizer_for(role)

    def optimizer_for(self, role: str) -> OptimizerConfig:
        overrides = self.roles.get(role, {})
        optimizer = _build(OptimizerConfig, {**dataclasses.asdict(self.optimizer), **overrides}, f"recipe.roles.{role}")
        optimizer.validate(f"recipe.roles.{role}" if overrides else "recipe.optimizer")
        return optimizer


@dataclass
class RuntimeConfig:
    # The switches also take YAML booleans (true = on / bf16, false = off): `dvc exp run -S` rewrites
    # params.yaml and an unquoted off becomes false.
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: str | bool = "auto"  # auto (bf16 on CUDA, off elsewhere) | bf16 | off
    channels_last: str | bool = "auto"  # auto (on for CUDA) | on | off
    compile: str | bool = "off"  # torch.compile: off | on | auto (on for CUDA)
    deterministic: bool = False
    threads: int = 0  # torch intra-op threads on CPU; 0 keeps torch's default
    quiet: bool = False  # no progress bar or epoch lines (the bar shows only on a terminal anyway)
    # DataLoader workers for "files" storage only; 0 = auto: one per CPU core of the machine.
    num_workers: int = 0
    # DDP (torchrun): BatchNorm statistics over the global batch instead of each rank's shard, and how
    # long a rank waits for the others (a dead rank must end the job, not hang it).
    sync_batchnorm: bool = False
    ddp_timeout_s: float = 600.0

    @property
    def loader_workers(self) -> int:
        """``num_workers`` resolved: 0 (auto) is one worker per CPU core of this machine."""
        return self.num_workers or os.cpu_count() or 1

    def validate(self) -> None:
        _positive(self.ddp_timeout_s, "runtime.ddp_timeout_s")
        if isinstance(self.amp, bool):
            self.amp = "bf16" if self.amp else "off"
        check_choice(self.amp, ("auto", "bf16", "off"), "runtime.amp")
        for key in ("channels_last", "compile"):
            value = getattr(self, key)
            if isinstance(value, bool):
                setattr(self, key, "on" if value else "off")
            check_choice(getattr(self, key), ("auto", "on", "off"), f"runtime.{key}")
        _at_least(self.threads, 0, "runtime.threads")
        _at_least(self.num_workers, 0, "runtime.num_workers")


@dataclass
class TeacherConfig:
    seed: int = 0  # offline methods distil from the teacher trained with this seed
    runs_root: str = "runs/teacher"
    # A teacher checkpoint to distil from instead of runs_root/seed<seed>/final.pt (a pretrained teacher).
    checkpoint: str | None = None

    @property
    def weights(self) -> Path:
        return Path(self.runs_root) / f"seed{self.seed}" / "final.pt"


@dataclass
class WandbConfig:
    enabled: bool = True
    mode: str = "offline"  # offline | online | disabled; WANDB_MODE in the environment wins
    entity: str | None = None


@dataclass
class MlflowConfig:
    enabled: bool = True
    tracking_uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI in the environment wins
    experiment: str = "kd-reproduce"


@dataclass
class TrackingConfig:
    project: str = "kd-reproduce"
    group: str = "pipeline"
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass
class SlurmConfig:
    partition: str | None = None  # None: the cluster's default partition
    time_min: int = 60  # wall-clock limit of one run, minutes
    gpus_per_task: int = 1
    cpus_per_task: int = 4
    array_parallelism: int = 16  # array tasks running at the same time

    def validate(self) -> None:
        for key in ("time_min", "cpus_per_task", "array_parallelism"):
            _at_least(getattr(self, key), 1, f"pipeline.slurm.{key}")
        _at_least(self.gpus_per_task, 0, "pipeline.slurm.gpus_per_task")


@dataclass
class PipelineConfig:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # every method trains once per seed
    # Which methods `python -m reproduce recipe` runs (empty: the recipe's method and its baselines are
    # listed by the recipe itself). The DVC pipeline runs every registered method (registry.yaml).
    methods: list[str] = field(default_factory=list)
    # Fan-out of the runs: "auto" (every visible GPU, else the CPU) | "cpu" | a list of GPU indices "0,1,2,3".
    devices: str = "auto"
    runs_per_device: int = 1  # runs sharing one device at a time
    launcher: str = "local"  # local (processes on this machine) | slurm (one array job through submitit)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def validate(self) -> None:
        _at_least(self.runs_per_device, 1, "pipeline.runs_per_device")
        check_choice(self.launcher, ("local", "slurm"), "pipeline.launcher")
        if not self.seeds:
            raise ConfigError("pipeline.seeds: list at least one seed, e.g. [0, 1, 2]")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"pipeline.seeds: {self.seeds} repeats a seed")


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # Method coefficients by method name; each method validates its own block (methods/base.py).
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    # Sections owned by other stages (validated there): sweeps, analysis.
    sweep: dict[str, Any] = field(default_factory=dict)
    analysis: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Loading, overriding, validating


def load_config(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = (),
                extra: dict[str, Any] | None = None) -> Config:
    """Read ``path``, deep-merge ``extra`` (e.g. a best_params.yaml), apply ``key=value`` overrides."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such parameters file. Run from the project root, or pass --params PATH.")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    if extra:
        raw = deep_merge(raw, extra)
    for item in overrides:
        apply_override(raw, item)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    return _build(Config, raw, "")


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is parsed as YAML (``lr=0.1``,
    ``milestones=[30,60]``, ``flip=false``)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. recipe.epochs=10")
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(text)


def _build(cls: type, raw: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from ``raw``, checking keys and types recursively."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'params'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {_join(where, close[0])!r}?)" if close else f"; known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"unknown key {_join(where, key)!r}{hint}")
    values = {key: _coerce(hints[key], value, _join(where, key)) for key, value in raw.items()}
    built = cls(**values)
    validate = getattr(built, "validate", None)
    if validate is not None and cls not in _VALIDATED_BY_CALLER:
        validate()
    return built


# Validated by RecipeConfig, which knows whether the optimiser is the recipe's or a role's.
_VALIDATED_BY_CALLER: set[type] = {OptimizerConfig}


def build_dataclass(cls: type, raw: dict[str, Any] | None, where: str) -> Any:
    """Public entry for sections validated elsewhere (method parameters, sweep settings)."""
    return _build(cls, raw, where)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {hint}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {k: _coerce(args[1], v, _join(where, k)) for k, v in value.items()} if args else dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _is_float(value):  # YAML reads 5e-4 (no dot) as a string
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _positive(value: float, where: str) -> None:
    if not value > 0:
        raise ConfigError(f"{where}: must be > 0, got {value}")


def _at_least(value: float, low: float, where: str) -> None:
    if not value >= low:
        raise ConfigError(f"{where}: must be >= {low}, got {value}")


def check_choice(value: str, choices: tuple[str, ...] | list[str], where: str) -> str:
    if value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value
