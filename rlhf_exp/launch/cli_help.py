"""What `python -m rlhf_exp --help` and `--version` print: the config groups a person picks from, one line each
with their options, then where to look next. Hydra's own help lists every group of conf/ (the schemas and
the files other groups compose, too) and the whole default config: `--hydra-help` still shows its flags."""

from __future__ import annotations

from importlib import metadata

from rlhf_exp import __version__
from rlhf_exp.config import config_group_options

# the groups a person chooses from, in the order they matter, with what choosing one decides
CHOSEN_GROUPS = {
    "stage": "what runs: sft, rm (reward model), dpo, grpo, ppo; eval compares policies with a judge",
    "model": "the policy (and the reward model's base): hub models, the embedded SmolLM2-135M, a tiny random one",
    "data": "TL;DR, HH-RLHF, GSM8K, ShareGPT, generated arithmetic, local files (data=file) or the hub (data=hub)",
    "hardware": "a machine's profile: precision, micro batches, LoRA / 4-bit, memory; auto picks this machine's",
    "reward": "what scores GRPO / PPO rollouts: a reward model, a verifiable math check, keyword, length",
    "experiment": "whole setups: pipelines (SFT -> RM -> DPO / GRPO -> eval) and quick runs",
    "sweep": "sweep presets, run with -m: one MLflow parent run with a child per job, and a report",
    "parallel": "several processes under torchrun: ddp, zero1, zero2, fsdp, deepspeed_zero2, deepspeed_zero3",
    "dpo_loss": "DPO loss presets",
    "tracking": "where runs are logged: mlflow (the default) or none",
}
# groups nobody picks: composed by the ones above or by Hydra (conf/<group>/ still holds them)
COMPOSED_GROUPS = ("paths", "hydra", "experiment_stage", "stage_hardware")

POINTERS = (
    ("--cfg job", "the composed config, with your overrides applied (add them before --cfg)"),
    ("--info defaults", "which file each part of the config came from"),
    ("plan=true", "the memory plan of a run on this machine, without loading any weights"),
    ("-m key=a,b,c", "a sweep over the values (or -m sweep=<preset>)"),
    ("--hydra-help", "Hydra's own flags (multirun, shell completion: docs/configuration.md)"),
    ("--version", "the versions of rlhf_exp and the libraries it runs on"),
)


def help_text() -> str:
    width = max(map(len, CHOSEN_GROUPS)) + 1
    lines = [f"rlhf_exp {__version__}: RLHF experiments (SFT, reward model, DPO, GRPO, PPO) configured by Hydra and "
             "tracked in MLflow.", "",
             "usage: python -m rlhf_exp [group=option ...] [key=value ...]     (installed: rlhf-exp ...)",
             "   e.g. python -m rlhf_exp stage=grpo hardware=dgx_spark",
             "        python -m rlhf_exp experiment=tldr_pipeline", "", "config groups (group=option):"]
    for group, meaning in CHOSEN_GROUPS.items():
        options = ", ".join(config_group_options(group))
        lines += [f"  {group + ':':<{width}}  {meaning}", f"  {'':<{width}}    {options}"]
    lines += ["", "any key: key=value (stage.lr=1e-5, data.max_prompt_tokens=256); more:"]
    lines += [f"  {flag:<16} {what}" for flag, what in POINTERS]
    return "\n".join(lines)


def version_text() -> str:
    versions = []
    for name in ("torch", "transformers", "peft", "accelerate", "hydra-core", "mlflow"):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} missing")
    return f"rlhf_exp {__version__} ({', '.join(versions)})"
