"""Configuration: params.yaml + overrides, with errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from reproduce.config import ConfigError, apply_override, config_from_dict, load_config
from reproduce.methods import get_method

PROJECT = Path(__file__).resolve().parent.parent


def test_project_params_load_and_every_method_block_validates() -> None:
    config = load_config(PROJECT / "params.yaml")
    assert config.dataset.name == "digits"
    for name, block in config.methods.items():
        get_method(name).parse_params(block)
    assert config.pipeline.seeds == [0, 1, 2]


def test_unknown_key_names_the_dotted_path_and_suggests_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"recipe\.optimizer\.lrr.*did you mean 'recipe\.optimizer\.lr'"):
        config_from_dict({"recipe": {"optimizer": {"lrr": 0.1}}})


@pytest.mark.parametrize(("raw", "message"), [
    ({"recipe": {"epochs": "ten"}}, r"recipe\.epochs: expected an integer"),
    ({"recipe": {"epochs": 2.5}}, r"recipe\.epochs: expected an integer"),
    ({"dataset": {"augment": {"flip": "yes"}}}, r"dataset\.augment\.flip: expected true or false"),
    ({"recipe": {"schedule": {"milestones": 30}}}, r"recipe\.schedule\.milestones: expected a list"),
    ({"recipe": {"optimizer": {"lr": "fast"}}}, r"recipe\.optimizer\.lr: expected a number"),
])
def test_wrong_types_are_rejected_with_the_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_yaml_exponent_without_dot_is_still_a_number() -> None:
    assert config_from_dict({"recipe": {"optimizer": {"weight_decay": "5e-4"}}}).recipe.optimizer.weight_decay == 5e-4


def test_overrides_parse_values_as_yaml_and_create_nested_keys() -> None:
    raw: dict = {}
    for item in ("recipe.epochs=3", "recipe.schedule.milestones=[1, 2]", "dataset.augment.flip=false",
                 "methods.kd.temperature=2.5"):
        apply_override(raw, item)
    config = config_from_dict(raw)
    assert config.recipe.epochs == 3
    assert config.recipe.schedule.milestones == [1, 2]
    assert config.dataset.augment.flip is False
    assert config.methods["kd"]["temperature"] == 2.5


def test_malformed_override_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_override({}, "recipe.epochs")
    with pytest.raises(ConfigError, match="recipe.epochs is a value"):
        apply_override({"recipe": {"epochs": 3}}, "recipe.epochs.x=1")


def test_per_role_optimiser_overrides_only_that_role() -> None:
    config = config_from_dict({"recipe": {"optimizer": {"lr": 0.01}, "roles": {"teacher": {"lr": 0.1}}}})
    assert config.recipe.optimizer_for("teacher").lr == 0.1
    assert config.recipe.optimizer_for("student").lr == 0.01
    assert config.recipe.optimizer_for("teacher").momentum == config.recipe.optimizer.momentum
    with pytest.raises(ConfigError, match=r"recipe\.roles\.teacher\.learning_rate"):
        config_from_dict({"recipe": {"roles": {"teacher": {"learning_rate": 0.1}}}})


def test_method_parameters_are_validated_by_the_method() -> None:
    with pytest.raises(ConfigError, match=r"methods\.kd\.temprature.*did you mean 'methods\.kd\.temperature'"):
        get_method("kd").parse_params({"temprature": 3})
    with pytest.raises(ConfigError, match=r"methods\.dkd\.temperature: must be > 0"):
        get_method("dkd").parse_params({"temperature": -1})
    with pytest.raises(ConfigError, match=r"methods\.kd\.kd_weight: a loss weight must be >= 0"):
        get_method("kd").parse_params({"kd_weight": -0.5})
    with pytest.raises(ConfigError, match="unknown method 'kdd'"):
        get_method("kdd")


def test_missing_params_file_says_where_to_run_from(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such parameters file"):
        load_config(tmp_path / "params.yaml")


@pytest.mark.parametrize(("override", "message"), [
    ("recipe.optimizer.lr=-0.1", r"recipe\.optimizer\.lr: must be > 0"),
    ("recipe.roles.teacher.lr=0", r"recipe\.roles\.teacher\.lr: must be > 0"),
    ("recipe.batch_size=0", r"recipe\.batch_size: must be >= 1"),
    ("recipe.epochs=0", r"recipe\.epochs: must be >= 1"),
    ("recipe.optimizer.momentum=1.5", r"recipe\.optimizer\.momentum: must be in \[0, 1\)"),
    ("recipe.optimizer.weight_decay=-1e-4", r"recipe\.optimizer\.weight_decay: must be >= 0"),
    ("dataset.val_fraction=1", r"dataset\.val_fraction: must be in \[0, 1\)"),
    ("dataset.normalization=mnist", r"dataset\.normalization: 'mnist' is not one of"),
    ("runtime.amp=fp16", r"runtime\.amp: 'fp16' is not one of"),
    ("pipeline.seeds=[]", r"pipeline\.seeds: list at least one seed"),
])
def test_out_of_range_values_fail_before_training_with_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(PROJECT / "params.yaml", [override])


def test_on_off_switches_accept_yaml_booleans_as_dvc_exp_run_writes_them() -> None:
    """`dvc exp run -S` rewrites params.yaml, and an unquoted `off` is YAML's false."""
    config = load_config(PROJECT / "params.yaml", ["runtime.compile=off", "runtime.channels_last=true",
                                                   "runtime.amp=false"])
    assert (config.runtime.compile, config.runtime.channels_last, config.runtime.amp) == ("off", "on", "off")
    assert load_config(PROJECT / "params.yaml", ["runtime.compile=on"]).runtime.compile == "on"
    assert load_config(PROJECT / "params.yaml", ['runtime.compile="auto"']).runtime.compile == "auto"


def test_val_fraction_zero_is_the_paper_protocol() -> None:
    assert load_config(PROJECT / "params.yaml", ["dataset.val_fraction=0"]).dataset.val_fraction == 0
