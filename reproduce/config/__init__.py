"""Typed configuration: ``params.yaml`` plus overlays and ``--set key=value`` overrides, validated once,
when it is loaded, by pydantic models (one per section: reproduce/config/sections.py for a run,
stages.py for the sweeps and the analysis, schema.py for the whole and the names it picks from the
registries).

Every error is a ``ConfigError`` of one line that names the offending key by its dotted path
(``recipe.optimizer.lr``) and what it expects, so a typo fails in the first second of a run instead of
after an hour of training. Consumers read attributes (``config.recipe.epochs``) and may rely on every
value being checked: nothing downstream needs to check a configured value again.
"""

from reproduce.config.base import build_dataclass, check_choice
from reproduce.config.load import apply_override, config_from_dict, deep_merge, load_config, read_yaml
from reproduce.config.schema import Config
from reproduce.config.sections import (AugmentConfig, DatasetConfig, MlflowConfig, ModelsConfig, OptimizerConfig,
                                       PipelineConfig, RecipeConfig, RuntimeConfig, ScheduleConfig, SlurmConfig,
                                       TeacherConfig, TrackingConfig, WandbConfig)
from reproduce.config.stages import AnalysisConfig, HeartbeatConfig, PrunerConfig, SweepConfig
from reproduce.errors import ConfigError

__all__ = [
    "AnalysisConfig", "AugmentConfig", "Config", "ConfigError", "DatasetConfig", "HeartbeatConfig", "MlflowConfig",
    "ModelsConfig", "OptimizerConfig", "PipelineConfig", "PrunerConfig", "RecipeConfig", "RuntimeConfig",
    "ScheduleConfig", "SlurmConfig", "SweepConfig", "TeacherConfig", "TrackingConfig", "WandbConfig", "apply_override",
    "build_dataclass", "check_choice", "config_from_dict", "deep_merge", "load_config", "read_yaml",
]
