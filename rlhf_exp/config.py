"""Composing and checking the Hydra config.

`conf/` sits beside the package (a source checkout or an editable install). Everything here
works without Hydra's `@main`, so tests and tools can `compose_config([...])` and call
`rlhf_exp.app.run(cfg)` directly.
"""

from __future__ import annotations

import math
import os
import secrets
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from rlhf_exp.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"

_PROCESS_RUN_ID = secrets.token_hex(3)


def run_id() -> str:
    # One id per process; all ranks of a torchrun job share torchrun's job id (or RLHF_EXP_RUN_ID).
    # `accelerate launch` passes the id "none" to every job: its ranks share their parent, the launcher.
    shared = os.environ.get("RLHF_EXP_RUN_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "")[:6]
    if shared == "none":
        shared = f"p{os.getppid()}"
    return shared or _PROCESS_RUN_ID


def best_attention() -> str:
    """flash_attention_2 where the flash-attn package is installed and a GPU is visible, else sdpa."""
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa"
    import torch

    return "flash_attention_2" if torch.cuda.is_available() else "sdpa"


def detect_hardware_profile() -> str:
    """The hardware profile for this machine: what `hardware=auto` becomes."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).upper()
    total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    if "GB10" in name or "SPARK" in name:
        return "dgx_spark"
    if "4090" in name or total_gb < 40:
        return "rtx4090"  # 24 GB class: QLoRA settings
    return "h100"  # 80 GB class (H100, H200, A100-80GB)


def resolve_auto_hardware(overrides: Iterable[str]) -> list[str]:
    """Command-line overrides with `hardware=auto` (or no hardware choice) made concrete."""
    overrides = list(overrides)
    choices = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") == "hardware"]
    if choices and any(o.split("=", 1)[1] != "auto" for o in choices):
        return overrides
    picked = f"hardware={detect_hardware_profile()}"
    kept = [o for o in overrides if o not in choices]
    # beside the other overrides: Hydra's command line takes them as one contiguous group
    last = max((i for i, o in enumerate(kept) if "=" in o and not o.startswith("-")), default=len(kept) - 1)
    return kept[: last + 1] + [picked] + kept[last + 1:]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("best_attention"):
        OmegaConf.register_new_resolver("best_attention", best_attention)
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", run_id)


register_resolvers()


def compose_config(overrides: Iterable[str] = ()) -> DictConfig:
    """The config `python -m rlhf_exp <overrides>` would run with (without the `hydra` node)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=resolve_auto_hardware(overrides))


def config_group_options(group: str) -> list[str]:
    """Option names of a config group, e.g. `model` -> ["llama2_7b", ..., "tiny"]."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# (key, test, what it must be). Checked before any data or weights are loaded.
_POSITIVE = "must be > 0"
_NON_NEGATIVE = "must be >= 0"
_RULES: list[tuple[str, Any, str]] = [
    ("stage.lr", lambda v: v > 0 and math.isfinite(v), _POSITIVE),
    ("stage.max_steps", lambda v: v >= 0, _NON_NEGATIVE),
    ("stage.batch_size", lambda v: v > 0, _POSITIVE),
    ("stage.warmup_steps", lambda v: v >= 0, _NON_NEGATIVE),
    ("stage.min_lr_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("stage.weight_decay", lambda v: v >= 0, _NON_NEGATIVE),
    ("stage.max_grad_norm", lambda v: v is None or v > 0, _POSITIVE + " (or null: no clipping)"),
    ("stage.eval_every", lambda v: v is None or v > 0, _POSITIVE + " (or null)"),
    ("stage.eval_examples", lambda v: v is None or v > 0, _POSITIVE + " (or null: the whole split)"),
    ("stage.num_samples", lambda v: v >= 0, _NON_NEGATIVE),
    ("stage.save_every", lambda v: v is None or v > 0, _POSITIVE + " (or null)"),
    ("stage.generation.temperature", lambda v: v > 0, _POSITIVE),
    ("stage.generation.max_new_tokens", lambda v: v > 0, _POSITIVE),
    ("stage.margin", lambda v: v >= 0, _NON_NEGATIVE),
    ("stage.norm_examples", lambda v: v >= 0, _NON_NEGATIVE),
    ("stage.calibration_bins", lambda v: v > 0, _POSITIVE),
    ("stage.beta", lambda v: v > 0, _POSITIVE),
    ("stage.label_smoothing", lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"),
    ("stage.loss_type", lambda v: v in {"sigmoid", "ipo", "hinge"}, "must be one of sigmoid, ipo, hinge"),
    ("stage.samples_per_prompt", lambda v: v >= 2, "must be >= 2 (advantages compare samples of a prompt)"),
    ("stage.minibatch_size", lambda v: v > 0, _POSITIVE),
    ("stage.updates_per_rollout", lambda v: v > 0, _POSITIVE),
    ("stage.clip_ratio", lambda v: 0 < v < 1, "must be in (0, 1)"),
    ("stage.dual_clip_c", lambda v: v is None or v > 1, "must be > 1 (or null: no dual clip)"),
    ("stage.kl_coef", lambda v: v >= 0, _NON_NEGATIVE),
    ("stage.kl_estimator", lambda v: v in {"k1", "k2", "k3"}, "must be one of k1, k2, k3"),
    ("stage.loss_aggregation", lambda v: v in {"token-mean", "seq-mean-token-mean"},
     "must be token-mean or seq-mean-token-mean"),
    ("stage.ppo_epochs", lambda v: v > 0, _POSITIVE),
    ("stage.gamma", lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ("stage.lam", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("stage.vf_coef", lambda v: v >= 0, _NON_NEGATIVE),
    ("stage.ptx_coef", lambda v: v >= 0, _NON_NEGATIVE),
    ("stage.ema_decay", lambda v: v is None or 0 < v < 1, "must be in (0, 1) (or null: no EMA)"),
    ("stage.critic_init", lambda v: v in {"auto", "reward_model", "policy"}, "must be auto, reward_model or policy"),
    ("model.num_layers", lambda v: v is None or v > 0, _POSITIVE + " (or null: all layers)"),
    ("data.val_size", lambda v: v > 0, _POSITIVE),
    ("data.max_prompt_tokens", lambda v: v > 0, _POSITIVE),
    ("data.max_response_tokens", lambda v: v > 0, _POSITIVE),
    ("data.max_train_examples", lambda v: v is None or v > 0, _POSITIVE + " (or null: all)"),
    ("hardware.optimizer", lambda v: v in {"adamw", "adamw_8bit", "paged_adamw_8bit"},
     "must be one of adamw, adamw_8bit, paged_adamw_8bit"),
    ("hardware.device", lambda v: v in {"cpu", "cuda"} or str(v).startswith("cuda:"), "must be cpu or cuda[:N]"),
    ("hardware.memory_gb", lambda v: v is None or v > 0, _POSITIVE + " (or null: detect)"),
    ("hardware.attn_implementation", lambda v: v in {"sdpa", "eager", "flash_attention_2"},
     "must be one of sdpa, eager, flash_attention_2"),
    ("hardware.rollout_backend", lambda v: v == "hf",
     "must be hf (transformers generate); other backends are not built in yet"),
    ("hardware.lora.r", lambda v: v > 0, _POSITIVE),
    ("hardware.lora.alpha", lambda v: v > 0, _POSITIVE),
    ("hardware.lora.dropout", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("hardware.precision", lambda v: v in {"fp32", "bf16", "fp16"}, "must be one of fp32, bf16, fp16"),
    ("model.source", lambda v: v in {"gguf", "hub", "local", "config"},
     "must be one of gguf, hub, local, config"),
]


def validate(cfg: DictConfig) -> None:
    """Stop with a message naming the key before any work starts."""
    absent = object()
    for key, ok, must in _RULES:
        try:
            value = OmegaConf.select(cfg, key, default=absent, throw_on_missing=True)
        except Exception as exc:  # a ??? left unset, or a broken interpolation
            raise ConfigError(key, f"has no value ({exc.__class__.__name__}); set it on the command line") from None
        if value is absent:
            continue  # this stage has no such key
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            raise ConfigError(key, f"{must} (got {value!r})")
    if cfg.hardware.get("load_in_4bit") and not cfg.hardware.lora.enabled:
        raise ConfigError("hardware.load_in_4bit", "4-bit weights are frozen: set hardware.lora.enabled=true (QLoRA)")
    micro = OmegaConf.select(cfg, f"hardware.micro_batch_size.{cfg.stage.name}")
    # RL stages split each optimizer step's minibatch into micro batches; the others the global batch.
    whole_key = "stage.minibatch_size" if "minibatch_size" in cfg.stage else "stage.batch_size"
    whole = OmegaConf.select(cfg, whole_key)
    if micro is not None and (micro <= 0 or whole % micro):
        raise ConfigError(
            f"hardware.micro_batch_size.{cfg.stage.name}",
            f"must be > 0 and divide {whole_key}={whole} (got {micro})",
        )


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
