"""Tests that need a CUDA GPU (`pytest -m gpu`; `make gpu-check` runs them there). Elsewhere each is skipped with
its reason shown (`-ra`). The CPU tests of the same code paths are in tests/test_gpu_paths.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: make gpu-check runs it on one")]


@pytest.fixture
def on_gpu() -> list[str]:
    """The tiny test model on the GPU in bf16; its tokenizer from a gpu-check bundle where the GGUF is missing."""
    from rlhf_exp.config import compose_config
    from rlhf_exp.models.embedded import gguf_available

    overrides = ["hardware.device=cuda", "hardware.precision=bf16"]
    bundle = os.environ.get("RLHF_EXP_GPU_BUNDLE")
    tiny = compose_config(["model=tiny"])
    if bundle and not gguf_available(tiny.model.tokenizer, tiny.paths.cache_dir):
        overrides += ["model.tokenizer.source=local", f"++model.tokenizer.path={Path(bundle) / 'tokenizer'}"]
    return overrides


def trainer_on_gpu(cls, tmp_path: Path, *overrides: str):
    """A set-up trainer of the tiny config without MLflow (a GPU machine may lack it: make gpu-check's bundle
    brings only what the checks import)."""
    from helpers import TINY
    from rlhf_exp.config import compose_config, resolved
    from rlhf_exp.tracking import Tracker

    cfg = resolved(compose_config([*TINY, f"paths.runs_dir={tmp_path / 'runs'}", "tracking=none", *overrides]))
    trainer = cls(cfg, Tracker(), tmp_path / "run")
    trainer.setup()
    return trainer


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "grpo", "ppo"])
def test_every_stage_takes_a_finite_bf16_step_on_the_gpu(tmp_path, on_gpu, stage):
    from helpers import GRPO, PAIRS, PPO
    from rlhf_exp.stages import stage_spec

    extra = {"sft": [], "rm": ["stage=rm", *PAIRS], "dpo": ["stage=dpo", *PAIRS], "grpo": GRPO, "ppo": PPO}[stage]
    trainer = trainer_on_gpu(stage_spec(stage).trainer, tmp_path, *extra, *on_gpu)
    metrics = trainer.checked(trainer.train_step)
    assert all(p.device.type == "cuda" for p in trainer.model.parameters())
    assert torch.isfinite(torch.tensor(metrics["train/loss"])), metrics
    trainer.close()


def test_a_qlora_grpo_step_with_paged_8bit_adam_on_the_gpu(tmp_path, on_gpu):
    from helpers import GRPO, LORA
    from rlhf_exp.models.peft import is_4bit
    from rlhf_exp.stages.grpo import GRPOTrainer

    trainer = trainer_on_gpu(GRPOTrainer, tmp_path, *GRPO, *LORA, *on_gpu, "hardware.load_in_4bit=true",
                          "hardware.optimizer=paged_adamw_8bit", "hardware.gradient_checkpointing=true")
    assert is_4bit(trainer.model)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = trainer.checked(trainer.train_step)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if p.requires_grad)
    trainer.close()


def test_rollouts_on_the_gpu_follow_the_runs_seed(tmp_path, on_gpu):
    """The run's rollout generator lives on the GPU: the same seed samples the same tokens, another seed others."""
    from helpers import GRPO
    from rlhf_exp.stages.grpo import GRPOTrainer

    trainer = trainer_on_gpu(GRPOTrainer, tmp_path, *GRPO, *on_gpu, "stage.generation.max_new_tokens=16")
    prompts = [trainer.train_set[i].prompt_ids for i in range(2)]
    draw = lambda seed: trainer.sample(prompts, 3, generator=torch.Generator("cuda").manual_seed(seed))  # noqa: E731
    assert draw(1) == draw(1) != draw(2)
    trainer.close()


def test_hardware_auto_on_this_gpu_plans_against_its_free_memory():
    from rlhf_exp.config import AUTO_CHOICE, resolve_auto_hardware

    overrides = resolve_auto_hardware(["stage=sft"])
    free = torch.cuda.mem_get_info(0)[0] / 2**30
    memory = [o for o in overrides if o.startswith("hardware.memory_gb=")]
    assert memory and abs(float(memory[0].split("=")[1]) - free) < 2.0
    assert torch.cuda.get_device_name(0) in AUTO_CHOICE[0]
