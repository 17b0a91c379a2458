"""``Config``: the whole of params.yaml, validated once when it is loaded. Besides each section's own
types and ranges, names are checked against the registries they pick from (a model, a dataset, a
method), with the list of choices, so that a typo fails before any data is read; and each method's
coefficients are checked by the method itself (its ``Params``)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field, model_validator

from reproduce.config.base import Section, check_finite
from reproduce.config.sections import (DatasetConfig, ModelsConfig, PipelineConfig, RecipeConfig, RuntimeConfig,
                                       TeacherConfig, TrackingConfig)
from reproduce.config.stages import AnalysisConfig, SweepConfig


def _blocks(raw: Any) -> Any:
    """``methods: {kd: }`` (an entry with nothing under it) is the method's defaults."""
    return {name: {} if block is None else block for name, block in raw.items()} if isinstance(raw, dict) else raw


class Config(Section):
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    recipe: RecipeConfig = Field(default_factory=RecipeConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    # Method coefficients by method name, as written (each method's Params, checked at load, gives the
    # values: `get_method(name).parse_params(config.methods.get(name))`).
    methods: Annotated[dict[str, dict[str, Any]], BeforeValidator(_blocks)] = Field(default_factory=dict)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)

    @model_validator(mode="after")
    def _names_and_coefficients(self) -> Config:
        check_finite(self.to_dict(), "")  # also the sections typed Any: coefficients, roles, spaces
        for key in ("teacher", "student"):
            check_model(getattr(self.models, key), f"models.{key}")
        check_dataset(self.dataset.name)
        from reproduce.methods.base import get_method  # the method registry imports torch

        for name, block in self.methods.items():
            get_method(name, "methods").parse_params(block)
        for name in self.pipeline.methods:
            get_method(name, "pipeline.methods")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


def check_model(name: str, where: str) -> None:
    """``name`` is a model of the zoo, else a ConfigError listing them (with the closest)."""
    from reproduce.models.registry import MODELS

    MODELS.get(name, where)


def check_dataset(name: str) -> None:
    """``dataset.name`` is a registered data source (reproduce/data/sources/), else the list of them."""
    from reproduce.data.sources import SOURCES  # imports no torch

    SOURCES.get(name, "dataset.name")
