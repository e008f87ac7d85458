"""Composing and checking the Hydra config.

`conf/` sits beside the package in a checkout (and an editable install) and inside it in a wheel
(`rlhf_exp/conf`, pyproject.toml's package-dir). Everything here works without Hydra's `@main`, so tests
and tools can `compose_config([...])` and call `rlhf_exp.launch.run.run(cfg)` directly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig, OmegaConf

from rlhf_exp.errors import ConfigError, UserInputError

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent  # the checkout in a source tree; site-packages in a wheel


def _conf_dir() -> Path:
    checkout = PROJECT_ROOT / "conf"
    return checkout if (checkout / "config.yaml").is_file() else PACKAGE_DIR / "conf"


CONF_DIR = _conf_dir()


def _add_checkout_plugins() -> None:
    """Hydra finds plugins by walking the `hydra_plugins` namespace package. A wheel installs this project's
    (hydra_plugins/rlhf_exp_optuna) into site-packages; an editable install maps packages without adding the
    checkout to that namespace, so the checkout's folder joins it here, before Hydra first scans."""
    import hydra_plugins

    folder = str(PROJECT_ROOT / "hydra_plugins")
    if Path(folder).is_dir() and folder not in list(hydra_plugins.__path__):
        hydra_plugins.__path__.append(folder)


_add_checkout_plugins()


def output_root() -> Path:
    """paths.root_dir's default (conf/paths/default.yaml) for tools that read runs without composing a config."""
    return Path(os.environ.get("RLHF_EXP_ROOT") or os.getcwd()).resolve()

_PROCESS_RUN_IDS: dict[int, str] = {}

# What a resumed run may change: when it stops, what it evaluates, samples and saves, what a NaN does.
# Everything else in the stage's groups (StageSpec.resume_fixed) and these hardware keys would train
# a different run (a changed stage.lr used to keep the old schedule silently), so it is refused.
CHANGEABLE_ON_RESUME = ("stage.max_steps", "stage.eval_every", "stage.eval_examples", "stage.num_samples",
                        "stage.save_every", "stage.resume_from", "stage.on_nonfinite", "data.allow_changed_on_resume")
FIXED_HARDWARE = ("hardware.lora", "hardware.load_in_4bit", "hardware.optimizer", "hardware.master_weights")


def run_id() -> str:
    # One id per process; all ranks of a torchrun job share torchrun's job id (or RLHF_EXP_RUN_ID).
    # `accelerate launch` passes the id "none" to every job: its ranks share their parent, the launcher.
    shared = os.environ.get("RLHF_EXP_RUN_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "")[:6]
    if shared == "none":
        shared = f"p{os.getppid()}"
    # keyed by pid: a process forked after import (a preloaded worker pool) gets an id of its own
    return shared or _PROCESS_RUN_IDS.setdefault(os.getpid(), secrets.token_hex(3))


log = logging.getLogger(__name__)

# compute capabilities flash-attn 2 has kernels for: Ampere (8.0, 8.6), Ada (8.9), Hopper (9.0); not
# Blackwell (10.x, 12.x: the GB10 of a DGX Spark is 12.1) nor anything older
FLASH_ATTENTION_CAPABILITIES = ((8, 0), (10, 0))


def best_attention() -> str:
    """flash_attention_2 where flash-attn imports (a wheel built for another torch is found but fails to load)
    and has kernels for the visible GPU, else sdpa; the choice and why are logged. Under flash-attention the
    prompt packing of DPO / RM / GRPO is off (it takes no block mask): they run padded rows."""
    import torch

    if not torch.cuda.is_available():
        return "sdpa"
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        log.info("attention: sdpa (flash-attn is not installed)")
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
    except Exception as error:  # ImportError, or an undefined symbol of a wheel built for another torch
        log.warning("attention: sdpa (flash-attn is installed but does not import: %s)", str(error).splitlines()[0][:200])
        return "sdpa"
    capability = torch.cuda.get_device_capability()
    low, high = FLASH_ATTENTION_CAPABILITIES
    if not low <= capability < high:
        log.info("attention: sdpa (flash-attn 2 has no kernels for compute capability %d.%d)", *capability)
        return "sdpa"
    log.info("attention: flash_attention_2 on compute capability %d.%d; DPO, RM and GRPO then run padded rows, "
             "not prompt-packed ones (flash-attention takes no block mask)", *capability)
    return "flash_attention_2"


def gpu_present() -> str | None:
    """What says an NVIDIA GPU is in this machine whether or not torch can use it (`nvidia-smi -L`, or the
    /dev/nvidia<N> device files), or None."""
    import glob
    import shutil
    import subprocess

    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            out = None
        gpus = [line for line in (out.stdout.splitlines() if out and out.returncode == 0 else [])
                if line.startswith("GPU ")]  # without a driver it exits non-zero, saying so on stdout
        if gpus:
            return f"nvidia-smi -L: {gpus[0]}"
    devices = sorted(glob.glob("/dev/nvidia[0-9]*"))
    return f"{devices[0]} exists" if devices else None


def detect_hardware() -> tuple[str, str, float | None]:
    """(profile, why, GiB free on the GPU or None) for this machine: what `hardware=auto` becomes. A GPU that
    is present but that torch cannot use stops the run: `auto` would otherwise train on the CPU, quietly."""
    import torch

    if not torch.cuda.is_available():
        present = gpu_present()
        if present:
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ConfigError("hardware", f"a GPU is present ({present}) but torch {torch.__version__} ({build}) "
                              "cannot use it: most often a torch built for a newer CUDA than the driver runs "
                              "(nvidia-smi shows the driver's CUDA version; docs/hardware.md's Docker section lists builds and drivers). "
                              "Install a matching torch, or pass hardware=cpu to train on the CPU")
        return "cpu", "no GPU", None
    name = torch.cuda.get_device_name(0)
    free, total = torch.cuda.mem_get_info(0)
    free_gib, total_gib = free / 2**30, total / 2**30
    if "GB10" in name.upper() or "SPARK" in name.upper():
        profile = "dgx_spark"
    elif "4090" in name or total_gib < 40:
        profile = "rtx4090"  # a 24 GB class card: QLoRA settings
    else:
        profile = "h100"  # 40 GB and more: LoRA in bf16
    return profile, f"{name}, {total_gib:.1f} GiB ({free_gib:.1f} free)", free_gib


AUTO_CHOICE: list[str] = []  # what `hardware=auto` became and why, logged once the run's logging is set up


def detect_hardware_profile() -> str:
    """The hardware profile for this machine: what `hardware=auto` becomes."""
    return detect_hardware()[0]


def resolve_auto_hardware(overrides: Iterable[str]) -> list[str]:
    """Command-line overrides with `hardware=auto` (or no hardware choice) made concrete: the profile that
    matches this machine, planned against the memory its GPU has free (not the profile's nominal card)."""
    overrides = list(overrides)
    choices = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") == "hardware"]
    if choices and any(o.split("=", 1)[1] != "auto" for o in choices):
        return overrides
    profile, why, free_gib = detect_hardware()
    picked = [f"hardware={profile}"]
    if free_gib is not None and not any(o.split("=", 1)[0] == "hardware.memory_gb" for o in overrides):
        picked.append(f"hardware.memory_gb={free_gib:.1f}")
        why += f"; planned against the {free_gib:.1f} GiB free"
    AUTO_CHOICE[:] = [f"hardware=auto: {profile} ({why})"]
    kept = [o for o in overrides if o not in choices]
    # beside the other overrides: Hydra's command line takes them as one contiguous group
    last = max((i for i, o in enumerate(kept) if "=" in o and not o.startswith("-")), default=len(kept) - 1)
    return kept[: last + 1] + picked + kept[last + 1:]


def check_yaml_of_choices(overrides: Iterable[str], conf_dir: Path = CONF_DIR) -> None:
    """The YAML files the command line picks (`experiment=x` -> conf/experiment/x.yaml, each option of a sweep's
    list) and conf/config.yaml parse: a syntax error is one line naming the file, line and column, not
    Hydra's traceback of ~95 lines."""
    import yaml

    files = [conf_dir / "config.yaml"]
    for override in overrides:
        key, equals, value = override.partition("=")
        key = key.lstrip("+~")
        if equals and not override.startswith("-") and "." not in key and (conf_dir / key).is_dir():
            files += [conf_dir / key / f"{option.strip()}.yaml" for option in value.split(",") if option.strip()]
    for path in files:
        if not path.is_file():
            continue
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise UserInputError(f"{where}: {problem} (YAML syntax)") from None


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("best_attention"):
        OmegaConf.register_new_resolver("best_attention", best_attention)
    if not OmegaConf.has_resolver("working_dir"):
        # outputs go under the folder a run is started from, as with every Hydra application (Hydra >= 1.2
        # leaves the working directory as it is); cached, so a config resolves to one folder
        OmegaConf.register_new_resolver("working_dir", lambda: os.getcwd(), use_cache=True)
    if not OmegaConf.has_resolver("run_id"):
        # cached like Hydra's ${now:}: a launcher's worker process (joblib, submitit) rebuilds each job's
        # config from the sweep's, with its resolved values, and must land in the same sweep folder
        OmegaConf.register_new_resolver("run_id", run_id, use_cache=True)


register_resolvers()


_SCHEMAS_REGISTERED: list[bool] = []


def register_schemas() -> None:
    """The typed schemas in Hydra's ConfigStore, where the group YAMLs name them in their defaults:
    schema/{model,data,hardware} (rlhf_exp.schema) and schema/stage/<name> for every conf/stage/<name>.yaml
    (the `config` its rlhf_exp/stages/<name>.py declares)."""
    if _SCHEMAS_REGISTERED:
        return
    from hydra.core.config_store import ConfigStore

    from rlhf_exp.schema import GROUP_SCHEMAS
    from rlhf_exp.stages import stage_spec

    store = ConfigStore.instance()
    for group, schema in GROUP_SCHEMAS.items():
        store.store(group="schema", name=group, node=schema)
    for name in config_group_options("stage"):
        store.store(group="schema/stage", name=name, node=stage_spec(name).config)
    _SCHEMAS_REGISTERED.append(True)


def compose_config(overrides: Iterable[str] = ()) -> DictConfig:
    """The config `python -m rlhf_exp <overrides>` would run with (without the `hydra` node)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schemas()
    if GlobalHydra.instance().is_initialized():  # inside `python -m rlhf_exp` (a pipeline composing its stages)
        return compose(config_name="config", overrides=resolve_auto_hardware(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=resolve_auto_hardware(overrides))


def config_group_options(group: str) -> list[str]:
    """Option names of a config group, e.g. `model` -> ["llama2_7b", ..., "tiny"]."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def resolved(cfg: DictConfig) -> DictConfig:
    """The config a run runs with: a plain copy without Hydra's node, every interpolation resolved, and
    the automatic choices made: hardware.precision=auto becomes what this machine runs fastest, and
    model.disable_dropout=null the stage's default. Idempotent."""
    from rlhf_exp.runtime import choose_precision
    from rlhf_exp.stages import stage_spec

    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    if "hydra" in plain:
        plain.pop("hydra")
    if OmegaConf.select(plain, "hardware.precision") == "auto":
        plain.hardware.precision = choose_precision("auto", str(plain.hardware.device))[0]
    spec = stage_spec(plain.stage.name)
    if "model" in plain and plain.model.get("disable_dropout") is None:
        plain.model.disable_dropout = spec.disable_dropout
    sizes = OmegaConf.select(plain, "hardware.micro_batch_size")
    if sizes is not None and sizes.get(spec.micro_batch) is None:
        sizes[spec.micro_batch] = spec.micro_batch_default
    out = OmegaConf.create(OmegaConf.to_container(plain, resolve=True))
    if "data" in out:
        resolve_data_sources(out.data)
    OmegaConf.set_struct(out, True)
    return out


def data_option(name: str, key: str) -> dict[str, Any]:
    """conf/data/<name>.yaml composed, as plain values: a source that data.blend or data.sources names."""
    if name not in config_group_options("data"):
        raise ConfigError(key, f"no conf/data/{name}.yaml (data options: {', '.join(config_group_options('data'))})")
    return OmegaConf.to_container(compose_config([f"data={name}"]), resolve=True)["data"]


def resolve_data_sources(data: DictConfig) -> None:
    """data.blend's {option: weight} and data.sources' [{path, weight, data: option, ...}] become whole data
    configs with their weight (the conf/data option each names, an entry's keys over it), so that loading
    the data composes nothing: rlhf_exp.data.source_configs reads them as they are. Idempotent."""
    blend = data.get("blend")
    if blend:
        if not hasattr(blend, "items"):
            raise ConfigError("data.blend", f"must be {{<data option>: weight > 0}}, got {blend!r}")
        data.blend = {name: blend_entry(name, entry) for name, entry in blend.items()}
    if data.get("sources"):
        data.sources = [mixture_entry(entry, index) for index, entry in enumerate(data.sources)]


def source_weight(weight: Any, key: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
        raise ConfigError(key, f"must be {{<data option>: weight > 0}}, got {weight!r}" if key.startswith("data.blend")
                          else f"must be a number > 0, got {weight!r}")
    return weight


def blend_entry(name: str, entry: Any) -> dict[str, Any]:
    """data.blend.<name>: its weight, or (resolved already) its whole config with the weight."""
    if hasattr(entry, "items"):  # resolved
        source_weight(entry.get("weight"), "data.blend")
        return OmegaConf.to_container(entry) if OmegaConf.is_config(entry) else dict(entry)
    return {**data_option(name, f"data.blend.{name}"), "weight": source_weight(entry, "data.blend")}


def mixture_entry(entry: Any, index: int) -> dict[str, Any]:
    """A data.sources entry as a whole data config: the conf/data option it names (`data`, else hub for
    source=hub and file otherwise) with the entry's keys (path, name, split, columns, val_size, ...) over it."""
    key = f"data.sources[{index}]"
    if not hasattr(entry, "items"):
        raise ConfigError(key, f"must be a mapping such as {{path: prefs.parquet, weight: 0.5}}, got {entry!r}")
    option = entry.get("data") or ("hub" if entry.get("source") == "hub" else "file")
    base = data_option(option, f"{key}.data")
    keys = {k: v for k, v in entry.items() if k not in ("data", "weight")}
    unknown = sorted(set(keys) - set(base))
    if unknown:
        raise ConfigError(key, f"unknown data keys {unknown} (keys of data={option}: {', '.join(sorted(base))})")
    weight = source_weight(entry.get("weight", 1.0), f"{key}.weight")
    merged = OmegaConf.to_container(OmegaConf.merge(base, keys), resolve=True)
    return {**merged, "data": option, "weight": weight}


def validate(cfg: DictConfig) -> None:
    """Stop with a message naming the key before any work starts: every field's rule in the schemas
    (the stage's own and model / data / hardware), the micro batch, then the stage's cross-key checks."""
    from rlhf_exp.factory import check_targets
    from rlhf_exp.schema import GROUP_SCHEMAS, RootConfig, rules, unknown_keys
    from rlhf_exp.stages import stage_spec
    from rlhf_exp.stages.spec import micro_batch

    spec = stage_spec(cfg.stage.name)
    schemas = {"stage": spec.config, **GROUP_SCHEMAS}
    for group, schema in schemas.items():
        extra = unknown_keys(cfg[group], schema, group)
        if extra:
            raise ConfigError(extra[0], f"is not a key of {group}={cfg[group].get('name')} "
                              f"(known: {', '.join(f.name for f in dataclasses.fields(schema))})")
    checked = rules(RootConfig, "") + [rule for group, schema in schemas.items() for rule in rules(schema, group)]
    absent = object()
    for key, rule in checked:
        try:
            value = OmegaConf.select(cfg, key, default=absent, throw_on_missing=True)
        except Exception as exc:  # a ??? left unset, or a broken interpolation
            raise ConfigError(key, f"has no value ({exc.__class__.__name__}); set it on the command line") from None
        if value is absent:
            continue
        try:
            good = rule.test(value)
        except TypeError:
            good = False
        if not good:
            raise ConfigError(key, f"{rule.must} (got {value!r})")
    check_targets(cfg, cfg.allowed_targets)
    check_init_from(cfg.model, spec)
    if cfg.hardware.get("load_in_4bit") and not cfg.hardware.lora.enabled:
        raise ConfigError("hardware.load_in_4bit", "4-bit weights are frozen: set hardware.lora.enabled=true (QLoRA)")
    micro, whole = micro_batch(cfg, spec.micro_batch), cfg.stage[spec.batch_key]
    if whole % micro:
        raise ConfigError(f"hardware.micro_batch_size.{spec.micro_batch}",
                          f"must divide stage.{spec.batch_key}={whole} (got {micro})")
    spec.checks(cfg)


def check_inputs(cfg: DictConfig) -> None:
    """What a run reads must be there before its tracker run is created (a refused launch leaves no FAILED
    run): the device, a data file, the reward model, the eval stage's policies and judges. A name that is
    not a local path (a hub id) is left to the loader."""
    from rlhf_exp.checkpoint_layout import looks_local, weights_folder
    from rlhf_exp.models.reward import is_reward_model_folder
    from rlhf_exp.runtime import check_device
    from rlhf_exp.stages import stage_spec

    spec = stage_spec(cfg.stage.name)
    check_device(cfg.hardware)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cfg.hardware.get("num_threads") and int(cfg.hardware.num_threads) > usable:
        raise ConfigError("hardware.num_threads", f"{cfg.hardware.num_threads} threads on the {usable} cores this "
                          f"process may use would oversubscribe them (each step many times slower): at most {usable}")
    if cfg.data.get("source") == "file" and cfg.data.get("path") and not Path(str(cfg.data.path)).exists():
        raise ConfigError("data.path", f"{cfg.data.path}: file not found")
    if spec.uses_reward and cfg.get("reward") is not None:
        missing = sorted(OmegaConf.missing_keys(cfg.reward))  # full keys: reward.fn.path
        if missing:
            hint = (" (the reward model: <rm run>/checkpoints/final, run:<MLflow run id> or a hub id)"
                    if missing[0] == "reward.fn.path" else "")
            raise ConfigError(missing[0], f"has no value; set {missing[0]}=...{hint}")
    reward_path = OmegaConf.select(cfg, "reward.fn.path")
    if isinstance(reward_path, str) and looks_local(reward_path) and not (
            is_reward_model_folder(weights_folder(reward_path))):
        what = ("does not exist" if not Path(reward_path).exists() else
                "is neither a reward model saved by stage=rm nor a ForSequenceClassification model")
        raise ConfigError("reward.fn.path", f"{reward_path} {what} (<rm run>/checkpoints/final, or a hub id)")
    spec.input_checks(cfg)


def check_init_from(model: DictConfig, spec) -> None:
    """model.init_from must be a folder with a model in it (a checkpoint of an earlier run); a reward
    model only for a stage that trains one (a policy loaded from one would get an LM head it never had)."""
    from rlhf_exp.checkpoint_layout import weights_folder
    from rlhf_exp.models.reward import is_reward_model_folder

    if not model.get("init_from"):
        return
    folder = weights_folder(model.init_from)
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "holds no model (no config.json)"
        raise ConfigError("model.init_from", f"{folder} {what}: name a checkpoint folder of an earlier run "
                          "(<run>/checkpoints/final)")
    if not spec.init_from_reward_model and is_reward_model_folder(folder):
        raise ConfigError("model.init_from", f"{folder} is a reward model, and stage={spec.name} trains a policy: "
                          "start it from a causal LM (an SFT run's checkpoints/final); a reward model goes in "
                          "reward.fn.path (reward=reward_model)")


def check_resumable(folder: Path, cfg: DictConfig, fixed_groups: Sequence[str]) -> None:
    """Refuse to resume `folder` under a config that differs where a resumed run cannot change,
    naming each differing key with its saved and new value."""
    from rlhf_exp.checkpoint import saved_config
    from rlhf_exp.redact import redact

    saved = flatten(saved_config(folder))
    now = flatten(redact(OmegaConf.to_container(cfg, resolve=True)))
    if saved.get("stage.name") != now["stage.name"]:
        raise ConfigError("stage.resume_from", f"{folder} is a checkpoint of stage={saved.get('stage.name')}, and "
                          f"this run is stage={now['stage.name']}: to start a {now['stage.name']} run from its "
                          f"weights, use model.init_from={folder}")
    scope = tuple(f"{group}." if group != "seed" else group for group in fixed_groups) + FIXED_HARDWARE

    def fixed(key: str) -> bool:
        return key.startswith(scope) and key not in CHANGEABLE_ON_RESUME

    differing = [f"{key}: {saved.get(key, '<absent>')} -> {now.get(key, '<absent>')}"
                 for key in sorted(set(saved) | set(now)) if fixed(key) and saved.get(key) != now.get(key)]
    if differing:
        raise ConfigError("stage.resume_from", f"{folder} was written with other settings, which a resumed run "
                          f"cannot change: {'; '.join(differing)}. Resume with the checkpoint's values, or start "
                          f"a new run from its weights (model.init_from={folder}); on resume only "
                          f"{', '.join(k.split('.', 1)[1] for k in CHANGEABLE_ON_RESUME)} of the stage may change")


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """{"stage": {"lr": 1e-5}} -> {"stage.lr": 1e-5}; lists become their string form."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, Any] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat
