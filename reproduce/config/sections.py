"""The sections of a run's configuration: the data, the networks, the recipe, where it runs, the
teacher, tracking and the pipeline's fan-out. Defaults are the code's; params.yaml sets the embedded
default's values and a paper recipe (configs/papers/*.yaml) the paper's."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from reproduce.config.base import (ConfigError, Flag, Integer, Number, Section, at_least, fraction, matching, positive,
                                   switch_bf16, switch_on, validate_section)


class AugmentConfig(Section):
    section = "dataset.augment"
    crop_padding: Annotated[Integer, at_least(0)] = 4  # random crop back to the input size after zero-padding
    flip: Flag = True  # random horizontal flip (off for digits: a mirrored 3 is not a 3)
    padding_mode: Literal["zeros", "reflect"] = "zeros"  # reflect: SOKD's loader


class DatasetConfig(Section):
    section = "dataset"
    name: str = "digits"  # a registered data source (reproduce/data/sources/), checked at load
    raw_root: str = "data/raw"
    prepared_root: str = "data/prepared"
    # Carved from the training set; sweeps and best-epoch selection use it (0 = none, the papers' protocol).
    val_fraction: Annotated[Number, fraction] = 0.15
    split_seed: Integer = 0
    download: Flag = False
    verify_md5: Flag = True
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    image_size: Annotated[Integer, at_least(1)] = 224  # only for "files" (ImageNet-scale) storage
    # Per-channel normalisation: "dataset" (the prepared training split's statistics) or the fixed
    # statistics an official code hard-codes.
    normalization: Literal["dataset", "cifar10", "cifar100", "imagenet"] = "dataset"
    gpu_decode: Flag = False  # ImageNet streaming: decode the JPEGs on the GPU (nvjpeg) instead of in workers

    @property
    def prepared_dir(self) -> Path:
        return Path(self.prepared_root) / self.name


class ModelsConfig(Section):
    section = "models"
    teacher: str = "resnet32x4"  # registered models (python -m reproduce methods), checked at load
    student: str = "resnet8x4"


class OptimizerConfig(Section):
    section = "recipe.optimizer"
    name: Literal["sgd", "adamw"] = "sgd"
    lr: Annotated[Number, positive] = 0.05
    momentum: Annotated[Number, fraction] = 0.9
    weight_decay: Annotated[Number, at_least(0)] = 5e-4
    nesterov: Flag = False


class ScheduleConfig(Section):
    section = "recipe.schedule"
    name: Literal["step", "cosine"] = "step"  # step: ×gamma at each milestone epoch
    milestones: list[Annotated[Integer, at_least(1)]] = Field(default_factory=lambda: [150, 180, 210])
    gamma: Annotated[Number, positive] = 0.1
    warmup_epochs: Annotated[Number, at_least(0)] = 0.0  # linear warm-up from 0, per iteration


class RecipeConfig(Section):
    section = "recipe"
    epochs: Annotated[Integer, at_least(1)] = 240
    batch_size: Annotated[Integer, at_least(1)] = 64
    eval_batch_size: Annotated[Integer, at_least(1)] = 512
    eval_every: Annotated[Integer, at_least(1)] = 1  # evaluate every this many epochs, and always after the last
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    # Per-role optimiser overrides over `optimizer`, e.g. {teacher: {lr: 0.1}} for SwitOKD.
    roles: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _roles_are_optimisers(self) -> RecipeConfig:
        for role in self.roles:
            self.optimizer_for(role)
        return self

    def optimizer_for(self, role: str) -> OptimizerConfig:
        overrides = self.roles.get(role) or {}
        if not overrides:
            return self.optimizer
        return validate_section(OptimizerConfig, {**self.optimizer.model_dump(), **overrides}, f"recipe.roles.{role}")


Switch = Literal["auto", "on", "off"]


class RuntimeConfig(Section):
    section = "runtime"
    # The switches also take YAML booleans (true = on / bf16, false = off): `dvc exp run -S` rewrites
    # params.yaml and an unquoted off becomes false.
    device: Annotated[str, matching(r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, cuda, cuda:N or mps")] = "auto"
    amp: Annotated[Literal["auto", "bf16", "off"], switch_bf16] = "auto"  # auto: bf16 on CUDA, off elsewhere
    channels_last: Annotated[Switch, switch_on] = "auto"  # auto: on for CUDA
    compile: Annotated[Switch, switch_on] = "off"  # torch.compile; auto: on for CUDA
    deterministic: Flag = False
    threads: Annotated[Integer, at_least(0)] = 0  # torch intra-op threads on CPU; 0 keeps torch's default
    quiet: Flag = False  # no progress bar or epoch lines (the bar shows only on a terminal anyway)
    # DataLoader workers for "files" storage: 0 = auto, one per CPU core of the machine (loader_workers).
    num_workers: Annotated[Integer, at_least(0)] = 0
    # DDP (torchrun): BatchNorm statistics over the global batch instead of each rank's shard, and how
    # long a rank waits for the others (a dead rank must end the job, not hang it).
    sync_batchnorm: Flag = False
    ddp_timeout_s: Annotated[Number, positive] = 600.0

    @property
    def loader_workers(self) -> int:
        """``num_workers`` resolved: 0 (auto) is one worker per CPU core of this machine."""
        import os

        return self.num_workers or os.cpu_count() or 1


class TeacherConfig(Section):
    section = "teacher"
    seed: Annotated[Integer, at_least(0)] = 0  # offline methods distil from the teacher trained with this seed
    runs_root: str = "runs/teacher"
    # A checkpoint to distil from instead of runs_root/seed<seed>/final.pt (a pretrained teacher).
    checkpoint: str | None = None

    @property
    def weights(self) -> Path:
        return Path(self.runs_root) / f"seed{self.seed}" / "final.pt"


class WandbConfig(Section):
    section = "tracking.wandb"
    enabled: Flag = True
    mode: Literal["offline", "online", "disabled"] = "offline"  # WANDB_MODE in the environment wins
    entity: str | None = None


class MlflowConfig(Section):
    section = "tracking.mlflow"
    enabled: Flag = True
    tracking_uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI in the environment wins
    experiment: str = "kd-reproduce"


class TrackingConfig(Section):
    section = "tracking"
    project: str = "kd-reproduce"
    group: str = "pipeline"
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)


class SlurmConfig(Section):
    section = "pipeline.slurm"
    partition: str | None = None  # None: the cluster's default partition
    time_min: Annotated[Integer, at_least(1)] = 60  # wall-clock limit of one run, minutes
    gpus_per_task: Annotated[Integer, at_least(0)] = 1
    cpus_per_task: Annotated[Integer, at_least(1)] = 4
    array_parallelism: Annotated[Integer, at_least(1)] = 16  # array tasks running at the same time


class PipelineConfig(Section):
    section = "pipeline"
    seeds: list[Annotated[Integer, at_least(0)]] = Field(default_factory=lambda: [0, 1, 2])  # every method, every seed
    # Which methods `python -m reproduce recipe` runs (registered methods, checked at load). The DVC
    # pipeline runs every registered method (registry.yaml).
    methods: list[str] = Field(default_factory=list)
    # Fan-out of the runs: "auto" (every visible GPU, else the CPU) | "cpu" | GPU indices "0,1,2,3".
    devices: Annotated[str, matching(r"auto|cpu|\d+(,\d+)*", "auto, cpu or GPU indices such as 0,1,2,3")] = "auto"
    runs_per_device: Annotated[Integer, at_least(1)] = 1  # runs sharing one device at a time
    launcher: Literal["local", "slurm"] = "local"  # slurm: one array job through submitit
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    @model_validator(mode="after")
    def _seeds(self) -> PipelineConfig:
        if not self.seeds:
            raise ConfigError("pipeline.seeds: list at least one seed, e.g. [0, 1, 2]")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"pipeline.seeds: {self.seeds} repeats a seed")
        return self
