"""Configuration: params.yaml + overrides, with errors that name the key."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from reproduce.config import ConfigError, ScheduleConfig, apply_override, build_dataclass, config_from_dict, load_config
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


# -- the typed schema: every section, the new keys, sweep and analysis -------------------------------


def test_new_keys_have_their_defaults_and_are_checked() -> None:
    config = config_from_dict({})
    assert config.teacher.checkpoint is None and config.recipe.eval_every == 1 and config.dataset.gpu_decode is False
    assert (config.pipeline.devices, config.pipeline.runs_per_device, config.pipeline.launcher) == ("auto", 1, "local")
    slurm = config.pipeline.slurm
    assert (slurm.partition, slurm.time_min, slurm.gpus_per_task, slurm.cpus_per_task, slurm.array_parallelism) == \
        (None, 60, 1, 4, 16)
    assert config.runtime.num_workers == 0 and config.runtime.loader_workers == (os.cpu_count() or 1)
    assert config_from_dict({"runtime": {"num_workers": 3}}).runtime.loader_workers == 3
    chosen = config_from_dict({"teacher": {"checkpoint": "teachers/r32x4.pt"}, "pipeline": {
        "devices": "0,1,2,3", "runs_per_device": 2, "launcher": "slurm", "slurm": {"partition": "gpu"}}})
    assert chosen.teacher.checkpoint == "teachers/r32x4.pt" and chosen.pipeline.devices == "0,1,2,3"
    assert chosen.pipeline.slurm.partition == "gpu" and chosen.pipeline.launcher == "slurm"


@pytest.mark.parametrize(("override", "message"), [
    ("recipe.eval_every=0", r"recipe\.eval_every: must be >= 1, got 0"),
    ("pipeline.runs_per_device=0", r"pipeline\.runs_per_device: must be >= 1"),
    ("pipeline.launcher=pbs", r"pipeline\.launcher: 'pbs' is not one of local, slurm"),
    ("pipeline.devices=gpu0", r"pipeline\.devices: expected auto, cpu or GPU indices such as 0,1,2,3, got 'gpu0'"),
    ("pipeline.slurm.time_min=0", r"pipeline\.slurm\.time_min: must be >= 1"),
    ("pipeline.slurm.partion=gpu", r"unknown key 'pipeline\.slurm\.partion' \(did you mean 'pipeline\.slurm\.partition'\?\)"),
    ("dataset.gpu_decode=yes please", r"dataset\.gpu_decode: expected true or false"),
    ("runtime.device=gpu", r"runtime\.device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    ("teacher.checkpoint=3", r"teacher\.checkpoint: expected a string, got 3"),
])
def test_new_keys_fail_with_the_key_and_what_it_takes(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(PROJECT / "params.yaml", [override])


SWEEP_DEFAULTS = {"methods": None, "n_trials": 4, "epochs_per_trial": 3, "seed": 0, "multi_objective": False,
                  "workers": 1, "storage": "sqlite:///studies/{method}.db",
                  "pruner": {"name": "median", "warmup_epochs": 1, "startup_trials": 2},
                  "heartbeat": {"interval_s": 60, "grace_s": 180}, "spaces": {}}
ANALYSIS_DEFAULTS = {"n_bins": 15, "order": [], "names": {}, "published_results": "analysis/published_results.yaml",
                     "reference_dataset": "cifar100", "png_dpi": 200, "pdf": False, "grid_columns": 3}


def test_sweep_and_analysis_are_typed_sections_with_attribute_access() -> None:
    defaults = config_from_dict({})
    assert defaults.to_dict()["sweep"] == SWEEP_DEFAULTS and defaults.to_dict()["analysis"] == ANALYSIS_DEFAULTS
    config = load_config(PROJECT / "params.yaml")
    assert config.sweep.n_trials == 3 and config.sweep.pruner.name == "median" and config.sweep.heartbeat.grace_s == 180
    assert config.analysis.n_bins == 15 and config.analysis.pdf is False
    assert config_from_dict({"analysis": None}).analysis.n_bins == 15  # `analysis:` with nothing under it


@pytest.mark.parametrize(("raw", "message"), [
    ({"sweep": {"n_trials": 0}}, r"sweep\.n_trials: must be >= 1, got 0"),
    ({"sweep": {"pruner": {"name": "successive"}}}, r"sweep\.pruner\.name: 'successive' is not one of median, hyperband, none"),
    ({"sweep": {"pruner": {"warmup_epochs": -1}}}, r"sweep\.pruner\.warmup_epochs: must be >= 0"),
    ({"sweep": {"storage": "studies/kd.db"}}, r"sweep\.storage: 'studies/kd\.db' is neither a database URL"),
    ({"sweep": {"n_trails": 4}}, r"unknown key 'sweep\.n_trails' \(did you mean 'sweep\.n_trials'\?\)"),
    ({"sweep": {"spaces": {"kdd": {}}}}, r"sweep\.spaces: unknown method 'kdd' \(did you mean 'kd'\?\)"),
    ({"sweep": {"methods": ["vanilla"]}}, r"sweep\.methods lists 'vanilla' but its search space is empty"),
    ({"sweep": {"heartbeat": {"interval_s": 60, "grace_s": 30}}}, r"sweep\.heartbeat: need interval_s >= 1 and grace_s"),
    ({"analysis": {"n_bins": 0}}, r"analysis\.n_bins: must be >= 1, got 0"),
    ({"analysis": {"png_dpi": 10}}, r"analysis\.png_dpi: must be >= 50, got 10"),
    ({"analysis": {"order": ["kd", "kd"]}}, r"analysis\.order: lists a label twice"),
    ({"analysis": {"n_bin": 10}}, r"unknown key 'analysis\.n_bin' \(did you mean 'analysis\.n_bins'\?\)"),
    ({"analysis": {"pdf": "no"}}, r"analysis\.pdf: expected true or false, got 'no'"),
])
def test_sweep_and_analysis_errors_name_the_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_a_section_built_directly_names_its_keys_too() -> None:
    with pytest.raises(ConfigError, match=r"recipe\.schedule\.name: 'linear' is not one of step, cosine"):
        ScheduleConfig(name="linear")


def test_the_dict_round_trips_and_method_blocks_may_be_empty() -> None:
    config = load_config(PROJECT / "params.yaml")
    assert config_from_dict(config.to_dict()) == config
    assert config_from_dict({"methods": {"kd": None}}).methods == {"kd": {}}


def test_integral_floats_are_integers_and_bools_are_not_numbers() -> None:
    assert config_from_dict({"recipe": {"epochs": 3.0}}).recipe.epochs == 3
    with pytest.raises(ConfigError, match=r"recipe\.epochs: expected an integer, got True"):
        config_from_dict({"recipe": {"epochs": True}})
    with pytest.raises(ConfigError, match=r"recipe\.optimizer\.lr: expected a number, got True"):
        config_from_dict({"recipe": {"optimizer": {"lr": True}}})
    with pytest.raises(ConfigError, match=r"recipe\.schedule\.milestones\[1\]: expected an integer"):
        config_from_dict({"recipe": {"schedule": {"milestones": [1, "two"]}}})


def test_a_dataclass_section_takes_the_same_values_as_the_config() -> None:
    """Methods' Params (and sweeps' ParamSpec) go through build_dataclass: same types, same messages."""
    @dataclasses.dataclass
    class Params:
        temperature: float = 4.0
        squared: bool = False
        steps: int = 1

    built = build_dataclass(Params, {"temperature": "5e-1", "steps": 2.0}, "methods.x")
    assert (built.temperature, built.steps) == (0.5, 2) and isinstance(built.steps, int)
    for raw, message in (({"squared": "yes"}, r"methods\.x\.squared: expected true or false, got 'yes'"),
                         ({"steps": 1.5}, r"methods\.x\.steps: expected an integer, got 1\.5"),
                         ({"temprature": 1}, r"unknown key 'methods\.x\.temprature' \(did you mean 'methods\.x\.temperature'\?\)"),
                         ({"temperature": float("inf")}, r"methods\.x\.temperature: must be a finite number, got inf")):
        with pytest.raises(ConfigError, match=message):
            build_dataclass(Params, raw, "methods.x")


# -- issue 22.3 and 22.5: what used to pass silently or end in a traceback ---------------------------


def test_an_empty_params_file_is_an_error_not_the_codes_defaults(tmp_path: Path) -> None:
    for text in ("", "# only a comment\n"):
        (tmp_path / "params.yaml").write_text(text)
        with pytest.raises(ConfigError, match=r"params\.yaml is empty: it would silently train the code's defaults "
                                              r"\(resnet32x4 -> resnet8x4, 240 epochs"):
            load_config(tmp_path / "params.yaml")


@pytest.mark.parametrize(("override", "message"), [
    ("recipe.optimizer.lr=.inf", r"recipe\.optimizer\.lr: must be a finite number, got inf"),
    ("recipe.optimizer.lr=.nan", r"recipe\.optimizer\.lr: must be a finite number, got nan"),
    ("recipe.schedule.gamma=-.inf", r"recipe\.schedule\.gamma: must be a finite number, got -inf"),
    ("methods.kd.temperature=.nan", r"methods\.kd\.temperature: must be a finite number, got nan"),
    ("recipe.roles.teacher.lr=.inf", r"recipe\.roles\.teacher\.lr: must be a finite number, got inf"),
    ("sweep.spaces.kd.temperature={type: float, low: 1, high: .inf}",
     r"sweep\.spaces\.kd\.temperature\.high: must be a finite number, got inf"),
])
def test_non_finite_numbers_are_refused_anywhere(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(PROJECT / "params.yaml", [override])


def test_garbage_yaml_names_the_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("dataset:\n  name: digits\n recipe: [1,\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert message.startswith(f"{path}, line 3, column 2: not valid YAML") and "fix that line" in message
    assert "<unicode string>" not in message and "\n" not in message
    path.write_text("- a list\n- not sections\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(path)


@pytest.mark.parametrize(("override", "message"), [
    ("models.student=resnet9", r"models\.student: unknown model 'resnet9' \(did you mean 'resnet8'\?\); available: .*resnet8x4"),
    ("models.teacher=wrn_16_3", r"models\.teacher: unknown model 'wrn_16_3'.*available: .*wrn_40_2"),
    ("dataset.name=cifar1000", r"dataset\.name: unknown dataset 'cifar1000' \(did you mean 'cifar100'\?\); available: "
                               r"cifar10, cifar100, digits"),
    ("methods.kdd={}", r"methods: unknown method 'kdd' \(did you mean 'kd'\?\)"),
    ("pipeline.methods=[dlm]", r"pipeline\.methods: unknown method 'dlm' \(did you mean 'dml'\?\)"),
    ("methods.dkd.warmup_epochs=0", r"methods\.dkd\.warmup_epochs"),
])
def test_names_and_coefficients_are_checked_at_load_with_the_choices(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(PROJECT / "params.yaml", [override])


def test_a_bad_override_value_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"override 'recipe\.schedule\.milestones=\[1,': the value is not valid YAML"):
        load_config(PROJECT / "params.yaml", ["recipe.schedule.milestones=[1,"])
