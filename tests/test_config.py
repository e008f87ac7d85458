"""The Hydra config: every group option composes, keys other tools rely on exist, bad values stop early."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from rlhf_exp.launch.run import resolved
from rlhf_exp.config import compose_config, config_group_options, validate
from rlhf_exp.errors import ConfigError
from rlhf_exp.tracking.mlflow_tracker import artifact_location, tracking_uri

GROUPS = ["model", "data", "stage", "hardware", "tracking", "reward", "paths", "experiment", "sweep"]


def all_options():
    for group in GROUPS:
        for option in config_group_options(group):
            yield group, option


@pytest.mark.parametrize(("group", "option"), list(all_options()))
def test_every_group_option_composes_resolves_and_validates(group, option):
    cfg = compose_config([f"{group}={option}"])
    plain = resolved(cfg)  # every interpolation resolves
    validate(plain)
    assert plain.hardware.precision in ("fp32", "bf16", "fp16")  # auto was made concrete


@pytest.mark.parametrize("stage", config_group_options("stage"))
def test_each_stage_is_its_module_and_its_yaml(stage):
    """conf/stage/<name>.yaml composes onto the schema rlhf_exp/stages/<name>.py declares, whose trainer runs it."""
    from rlhf_exp.schema import StageConfig
    from rlhf_exp.stages import stage_spec
    from rlhf_exp.stages.spec import StageRunner

    spec = stage_spec(stage)
    assert spec.name == stage and issubclass(spec.trainer, StageRunner) and issubclass(spec.config, StageConfig)
    cfg = compose_config([f"stage={stage}"])
    assert OmegaConf.get_type(cfg.stage) is spec.config
    assert spec.micro_batch in cfg.hardware.micro_batch_size and spec.batch_key in cfg.stage


def test_an_unknown_stage_names_the_files_a_stage_needs():
    from rlhf_exp.stages import stage_spec

    with pytest.raises(ConfigError, match=r"rlhf_exp/stages/orpo.py .*conf/stage/orpo.yaml"):
        stage_spec("orpo")


@pytest.mark.parametrize(("override", "key"), [
    ("stage.lr=fast", "stage.lr"),                        # a wrong type
    ("stage.max_steps=1.5", "stage.max_steps"),
    ("hardware.lora.r=four", "hardware.lora.r"),
    ("data.max_prompt_tokens=[1]", "data.max_prompt_tokens"),
])
def test_a_wrong_type_fails_at_composition_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException) as info:
        compose_config([override])
    assert key in str(info.value) + str(info.value.__cause__)


def test_a_key_of_another_stage_is_refused_at_composition():
    with pytest.raises(ConfigCompositionException, match="stage.beta"):
        compose_config(["stage=sft", "stage.beta=0.1"])  # beta is DPO's
    assert compose_config(["stage=dpo", "stage.beta=0.3"]).stage.beta == 0.3


def test_each_group_has_the_options_the_issue_names():
    assert {"smollm2_135m", "tiny", "qwen2_5_0_5b", "qwen2_5_1_5b", "mistral_7b", "llama2_7b",
            "opt_1_3b"} <= set(config_group_options("model"))
    assert {"tldr", "hh_rlhf", "jsonl", "sharegpt"} <= set(config_group_options("data"))
    assert {"sft", "rm", "dpo", "grpo", "ppo"} <= set(config_group_options("stage"))
    assert {"length", "keyword", "reward_model"} <= set(config_group_options("reward"))
    assert {"cpu", "dgx_spark", "h100", "rtx4090", "auto"} <= set(config_group_options("hardware"))
    assert {"mlflow", "none"} <= set(config_group_options("tracking"))


def test_defaults_are_the_embedded_model_on_tldr_sft_cpu():
    cfg = compose_config([])
    assert (cfg.model.name, cfg.data.name, cfg.stage.name, cfg.hardware.name) == ("smollm2_135m", "tldr", "sft", "cpu")
    assert cfg.tracking.backend == "mlflow"
    for key in ("stage.max_steps", "stage.lr", "stage.batch_size", "seed"):
        assert OmegaConf.select(cfg, key) is not None, key


def test_override_keys_other_tools_use():
    cfg = compose_config(["stage.max_steps=7", "stage.lr=1e-4", "stage.batch_size=16", "seed=3", "model=tiny"])
    assert (cfg.stage.max_steps, cfg.stage.lr, cfg.stage.batch_size, cfg.seed) == (7, 1e-4, 16, 3)


def test_paths_are_absolute():
    cfg = resolved(compose_config([]))
    for key in ("root_dir", "runs_dir", "cache_dir"):
        assert cfg.paths[key].startswith("/"), key


def test_unknown_option_and_unknown_key_are_refused_by_name():
    with pytest.raises(ConfigCompositionException, match="model/no_such_model"):
        compose_config(["model=no_such_model"])
    with pytest.raises((ConfigCompositionException, ConfigKeyError), match="no_such_key"):
        compose_config(["stage.no_such_key=1"])


@pytest.mark.parametrize(("override", "key"), [
    ("stage.lr=-1e-5", "stage.lr"),
    ("stage.lr=0", "stage.lr"),
    ("stage.batch_size=0", "stage.batch_size"),
    ("stage.max_steps=-2", "stage.max_steps"),
    ("hardware.optimizer=sgd", "hardware.optimizer"),
    ("data.val_size=0", "data.val_size"),
    ("stage.generation.temperature=0", "stage.generation.temperature"),
    ("hardware.micro_batch_size.sft=3", "hardware.micro_batch_size.sft"),
    ("stage.lr=nan", "stage.lr"),
    ("hardware.precision=fp8", "hardware.precision"),
    ("hardware.master_weights=bf16", "hardware.master_weights"),
    ("model.dtype=float8", "model.dtype"),
    # issue 11's bad configs: each named before anything loads, one line, exit 2 through the CLI
    ("seed=abc", "seed"),
    ("stage.generation.top_k=-1", "stage.generation.top_k"),
    ("stage.generation.top_p=2.0", "stage.generation.top_p"),
    ("stage.adam_betas=[2,3]", "stage.adam_betas"),
    ("hardware.num_threads=-1", "hardware.num_threads"),
    ("+stage.foo=1", "stage.foo"),
    ("+hardware.lora.rank=8", "hardware.lora.rank"),
    ("model.init_from=/", "model.init_from"),
    ("model.init_from=/no/such/folder", "model.init_from"),
])
def test_bad_values_are_named_before_any_work(override, key):
    cfg = resolved(compose_config(["model=tiny", override]))
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert info.value.key == key
    assert f"`{key}`" in str(info.value)


def test_mlflow_tracking_uri_from_environment_wins_over_the_default(monkeypatch, tmp_path):
    cfg = resolved(compose_config([]))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = tracking_uri(cfg.tracking, cfg.paths.root_dir)
    assert default == f"sqlite:///{cfg.paths.root_dir}/mlflow.db"
    assert artifact_location(cfg.tracking, default) == f"file://{cfg.paths.root_dir}/mlartifacts"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    assert tracking_uri(cfg.tracking, cfg.paths.root_dir) == f"sqlite:///{tmp_path}/m.db"
    assert artifact_location(cfg.tracking, f"sqlite:///{tmp_path}/m.db") == f"file://{tmp_path}/mlartifacts"


def test_hardware_auto_is_cpu_without_a_gpu_and_explicit_profiles_are_kept():
    from rlhf_exp.config import resolve_auto_hardware

    assert compose_config([]).hardware.name == "cpu"  # this machine has no GPU
    assert resolve_auto_hardware(["stage=dpo"]) == ["stage=dpo", "hardware=cpu"]
    assert resolve_auto_hardware(["hardware=auto", "seed=1"]) == ["seed=1", "hardware=cpu"]
    assert resolve_auto_hardware(["hardware=h100"]) == ["hardware=h100"]
    # next to the other overrides, so flags after them still parse
    assert resolve_auto_hardware(["model=tiny", "--cfg", "job"]) == ["model=tiny", "hardware=cpu", "--cfg", "job"]
    assert resolve_auto_hardware(["--cfg", "job"]) == ["--cfg", "job", "hardware=cpu"]


def test_seed_profiles_set_what_their_machines_need():
    h100, rtx = compose_config(["hardware=h100"]).hardware, compose_config(["hardware=rtx4090"]).hardware
    spark = compose_config(["hardware=dgx_spark"]).hardware
    assert h100.lora.enabled and not h100.load_in_4bit and h100.memory_gb == 80
    assert rtx.lora.enabled and rtx.load_in_4bit and rtx.optimizer == "paged_adamw_8bit" and rtx.memory_gb == 24
    assert spark.optimizer == "adamw_8bit" and not spark.lora.enabled
    # a stage x hardware special case is its own small file, composed in only for that pair
    assert compose_config(["hardware=rtx4090", "stage=grpo"]).hardware.micro_batch_size.grpo == 2
    assert compose_config(["hardware=h100", "stage=grpo"]).hardware.micro_batch_size.grpo == 16


def test_a_gpu_profile_without_a_gpu_stops_with_a_clear_message(tmp_path):
    from rlhf_exp.errors import ConfigError
    from rlhf_exp.runtime import make_runtime

    with pytest.raises(ConfigError, match="hardware=h100 needs a CUDA GPU"):
        make_runtime(compose_config(["hardware=h100"]).hardware)


def test_qlora_without_lora_is_refused():
    with pytest.raises(ConfigError, match="hardware.load_in_4bit"):
        validate(compose_config(["hardware.load_in_4bit=true"]))
