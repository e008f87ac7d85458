"""`plan=true` for the seeds' own configurations: the DGX Spark, H100 and RTX 4090 write-ups' stages, each planned
as the code loads it (`rlhf_exp.planner`; tests/test_planner.py asserts that each fits and that the planner holds
every model as the stage builds it).

    python experiments/hardware_planner/seed_plans.py      # prints the tables, writes seed_plans.md beside this file

A stage that scores with a reward model plans that model's shape from the config.json of the folder at
reward.fn.path; before such a model exists, a folder holding only the config.json of the seed's RM shape stands
in for it (made here in a temporary folder).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

# (machine, stage as the seed runs it, overrides, the model option whose shape the reward model has)
SEEDS = [
    ("DGX Spark", "sft: Qwen2.5-0.5B, full fine-tuning, 8-bit AdamW",
     ["stage=sft", "model=qwen2_5_0_5b", "hardware=dgx_spark"], None),
    ("DGX Spark", "rm: Qwen2.5-1.5B, full fine-tuning, 8-bit AdamW",
     ["stage=rm", "model=qwen2_5_1_5b", "hardware=dgx_spark"], None),
    ("DGX Spark", "grpo: Qwen2.5-0.5B policy, the 1.5B RM scoring",
     ["stage=grpo", "model=qwen2_5_0_5b", "hardware=dgx_spark", "reward=reward_model"], "qwen2_5_1_5b"),
    ("H100", "dpo: Mistral-7B, LoRA", ["stage=dpo", "data=hh_rlhf", "model=mistral_7b", "hardware=h100"], None),
    ("H100", "ppo: Mistral-7B LoRA, a Mistral-7B RM",
     ["stage=ppo", "data=hh_rlhf", "model=mistral_7b", "hardware=h100", "reward=reward_model"], "mistral_7b"),
    ("H100", "ppo: the same, vLLM rollouts",
     ["stage=ppo", "data=hh_rlhf", "model=mistral_7b", "hardware=h100", "reward=reward_model",
      "hardware.rollout_backend=vllm"], "mistral_7b"),
    ("RTX 4090", "sft: Llama-2-7B, QLoRA, paged 8-bit AdamW", ["stage=sft", "model=llama2_7b", "hardware=rtx4090"], None),
    ("RTX 4090", "rm: Llama-2-7B, QLoRA", ["stage=rm", "model=llama2_7b", "hardware=rtx4090"], None),
    ("RTX 4090", "ppo: Llama-2-7B QLoRA, a Llama-2-7B RM (4-bit) and critic",
     ["stage=ppo", "model=llama2_7b", "hardware=rtx4090", "reward=reward_model"], "llama2_7b"),
]


def reward_shape_folder(model_option: str, folder: Path) -> Path:
    """A folder with only the config.json of a sequence classifier of `model_option`'s shape (conf/model/<option>)."""
    from omegaconf import OmegaConf

    from rlhf_exp.config import compose_config

    arch = OmegaConf.to_container(compose_config([f"model={model_option}"]).model.arch, resolve=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**arch, "num_labels": 1}))
    return folder


def seed_overrides(overrides: list[str], reward_shape: str | None, workdir: Path) -> list[str]:
    if reward_shape is None:
        return list(overrides)
    return [*overrides, f"reward.fn.path={reward_shape_folder(reward_shape, workdir / reward_shape)}"]


def main() -> None:
    from rlhf_exp.config import compose_config
    from rlhf_exp.planner import plan_run

    lines = ["# The seeds' configurations, planned", "",
             "`python experiments/hardware_planner/seed_plans.py` (no weights, no GPU). GiB of the card's memory.", "",
             "| machine | stage | plan (GiB) | of | verdict | command |", "|---|---|---:|---:|---|---|"]
    tables = []
    with tempfile.TemporaryDirectory() as workdir:
        for machine, what, overrides, reward_shape in SEEDS:
            cfg = compose_config(seed_overrides(overrides, reward_shape, Path(workdir)))
            plan = plan_run(cfg)
            shown = " ".join(overrides) + (f" reward.fn.path=<a {reward_shape}-shaped RM>" if reward_shape else "")
            verdict = f"{'fits' if plan.fits else 'DOES NOT FIT'} ({plan.total_gib / plan.available_gib:.0%})"
            lines.append(f"| {machine} | {what} | {plan.total_gib:.1f} | {plan.available_gib:.0f} | {verdict} | "
                         f"`{shown} plan=true` |")
            tables.append(f"### {machine}, {what}\n\n```\n$ python -m rlhf_exp {shown} plan=true\n{plan.table()}\n```\n")
    text = "\n".join(lines) + "\n\n" + "\n".join(tables)
    print(text)
    (Path(__file__).parent / "seed_plans.md").write_text(text)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main()
