"""LoRA / QLoRA on every stage (tiny model): adapters train, the reference is the base with adapters
disabled, merge-and-export gives a plain Hugging Face folder, and LoRA runs resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import GRPO, LORA, PAIRS, VARIED, mlflow_runs, tiny_config, trainer_for
from rlhf_exp.launch.run import run
from rlhf_exp.models.peft import AdaptersDisabled, is_peft
from rlhf_exp.models.reward import load_reward_model
from rlhf_exp.ops.logprobs import masked_next_token_logprobs, next_token_logprobs
from rlhf_exp.stages.dpo import DPOTrainer
from rlhf_exp.stages.sft import SFTTrainer

QLORA = [*LORA, "hardware.load_in_4bit=true"]


def test_lora_trains_only_adapters_and_merges_into_a_plain_model(tmp_path):
    trainer = trainer_for(SFTTrainer, tmp_path, *LORA)
    model = trainer.model
    assert is_peft(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(2):
        trainer.train_step()
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(p, adapters_before[n]) for n, p in model.named_parameters() if p.requires_grad)

    merged = trainer.merged_model()
    assert not is_peft(merged)
    ids = torch.tensor([trainer.train_set[0].prompt_ids[:12]])
    model.eval()
    with torch.no_grad():
        lora_logits = model(input_ids=ids).logits
        merged_logits = merged(input_ids=ids).logits
        base_logits = AdaptersDisabled(model)(input_ids=ids).logits
    assert torch.allclose(lora_logits, merged_logits, atol=1e-4)
    assert not torch.allclose(lora_logits, base_logits, atol=1e-4)  # the adapters changed the function


def test_qlora_sft_run_writes_adapters_and_a_merged_folder_that_loads_without_peft(tmp_path):
    run(tiny_config(tmp_path, *QLORA, "stage.max_steps=2"))
    client, runs = mlflow_runs(tmp_path / "mlflow.db")
    assert runs[0].info.status == "FINISHED"
    final = Path(runs[0].data.tags["checkpoint_dir"])
    assert (final / "adapter_model.safetensors").is_file() and (final / "merged" / "config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    assert not is_peft(merged) and getattr(merged.config, "quantization_config", None) is None
    out = merged.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def test_lora_dpo_reference_is_the_base_with_adapters_disabled(tmp_path):
    trainer = trainer_for(DPOTrainer, tmp_path, "stage=dpo", *PAIRS, "stage.eval_examples=8", "stage.num_samples=0",
                          "hardware.micro_batch_size.dpo=2", "stage.precompute_ref_logps=false", *LORA)
    assert isinstance(trainer.reference, AdaptersDisabled)
    assert sum(p.numel() for p in trainer.reference.parameters()) == 0  # holds no copy
    pairs = trainer.val_set[:2]
    before = trainer.pair_logps(trainer.reference, pairs)[0].detach()
    assert torch.allclose(before, trainer.pair_logps(trainer.model, pairs)[0].detach(), atol=1e-5)  # B = 0 at start
    for _ in range(2):
        trainer.train_step()
    with torch.no_grad():
        after_ref = trainer.pair_logps(trainer.reference, pairs)[0]
        after_policy = trainer.pair_logps(trainer.model, pairs)[0]
    assert torch.allclose(before, after_ref, atol=1e-5)  # the reference did not move
    assert not torch.allclose(after_ref, after_policy, atol=1e-4)  # the policy did


@pytest.mark.parametrize("stage_overrides", [
    ["stage=rm", *PAIRS, "stage.norm_examples=8", "hardware.micro_batch_size.rm=2"],
    ["stage=grpo", *GRPO, *VARIED, "stage.minibatch_size=4", "hardware.micro_batch_size.grpo=4"],
    ["stage=ppo", "stage.batch_size=4", "stage.minibatch_size=2", "stage.ppo_epochs=1", "stage.eval_examples=4",
     "stage.generation.max_new_tokens=6", "data.max_prompt_tokens=48", "hardware.micro_batch_size.ppo=2",
     "reward.fn.target_tokens=3"],
], ids=["rm", "grpo", "ppo"])
def test_qlora_runs_every_other_stage(tmp_path, stage_overrides):
    metrics = run(tiny_config(tmp_path, *stage_overrides, *QLORA, "stage.max_steps=2"))
    client, runs = mlflow_runs(tmp_path / "mlflow.db")
    assert runs[0].info.status == "FINISHED" and metrics
    final = Path(runs[0].data.tags["checkpoint_dir"])
    assert (final / "merged").is_dir()
    if stage_overrides[0] == "stage=rm":  # the RM loader finds the merged model in a LoRA checkpoint
        rm, _ = load_reward_model(final)
        assert not is_peft(rm.backbone)


def test_lora_resume_reproduces_the_uninterrupted_losses(tmp_path):
    common = [*LORA, "stage.max_steps=4", "stage.eval_every=null", "stage.num_samples=0"]
    whole = run(tiny_config(tmp_path / "a", *common))
    run(tiny_config(tmp_path / "b", *common, "stage.save_every=2"))
    client, runs = mlflow_runs(tmp_path / "b" / "mlflow.db")
    step2 = Path(runs[0].data.tags["run_dir"]) / "checkpoints" / "step_000002"
    resumed = run(tiny_config(tmp_path / "c", *common, f"stage.resume_from={step2}"))
    assert resumed["train/loss"] == pytest.approx(whole["train/loss"], rel=1e-5)


def test_lora_policy_logprobs_match_a_plain_forward(tmp_path):
    """The fast path (decoder + head on selected positions) sees through the peft wrapper."""
    trainer = trainer_for(SFTTrainer, tmp_path, *LORA)
    trainer.train_step()
    item = trainer.train_set[0]
    ids = torch.tensor([item.prompt_ids + item.response_ids])
    with torch.no_grad():
        full = next_token_logprobs(trainer.model, ids, torch.ones_like(ids))
        fast = masked_next_token_logprobs(
            trainer.model, ids, None, torch.ones_like(ids))
    assert torch.allclose(full, fast, atol=1e-5)


def test_qlora_gradients_reach_every_adapter_after_an_evaluation(tmp_path):
    """bitsandbytes' CPU inference repacking (after an eval-mode, no-grad pass) must not cut the
    gradient through the 4-bit base: every adapter's B gets a non-zero gradient at the first step."""
    trainer = trainer_for(SFTTrainer, tmp_path, *QLORA)
    trainer.evaluate()  # eval mode + no_grad: where the repacking would happen
    trainer.model.train()
    item = trainer.train_set[0]
    ids = torch.tensor([item.prompt_ids + item.response_ids])
    logps = masked_next_token_logprobs(trainer.model, ids, None, torch.ones_like(ids))
    (-logps.sum()).backward()
    grads = {n: p.grad for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_lora_resume_from_a_checkpoint_without_adapters_names_the_key(tmp_path):
    from rlhf_exp.errors import ConfigError

    run(tiny_config(tmp_path / "full", "stage.max_steps=1", "stage.num_samples=0"))
    client, runs = mlflow_runs(tmp_path / "full" / "mlflow.db")
    full_checkpoint = runs[0].data.tags["checkpoint_dir"]
    with pytest.raises(ConfigError, match="stage.resume_from"):
        run(tiny_config(tmp_path / "lora", *LORA, f"stage.resume_from={full_checkpoint}"))
