"""Dropout: off in the preference and RL stages (policy, reference, critic, LoRA), kept in SFT, overridable."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import GRPO, PAIRS, PPO, VARIED, mlflow_runs, tiny_config, trainer_for
from rlhf_exp.launch.run import run
from rlhf_exp.stages.dpo import DPOTrainer
from rlhf_exp.stages.grpo import GRPOTrainer
from rlhf_exp.stages.ppo import PPOTrainer
from rlhf_exp.stages.sft import SFTTrainer

ATTENTION_DROPOUT = ["+model.config.attention_dropout=0.1"]
LORA_DROPOUT = ["hardware.lora.enabled=true", "hardware.lora.r=4", "hardware.lora.dropout=0.1"]


@pytest.mark.parametrize("dropout", [ATTENTION_DROPOUT, LORA_DROPOUT], ids=["attention", "lora"])
@pytest.mark.parametrize(("cls", "stage"), [
    # two passes over each rollout: the old log-probs come from a forward of their own
    (GRPOTrainer, [*GRPO, *VARIED, "stage.minibatch_size=4", "stage.updates_per_rollout=2", "stage.lr=1e-3"]),
    (PPOTrainer, PPO),
], ids=["grpo", "ppo"])
def test_first_minibatch_ratio_is_one_with_dropout_in_the_model(tmp_path, cls, stage, dropout):
    """Dropout noise between the rollout's forward and the update's makes the first ratio != 1 (N+ sanity
    check). Two rollouts: LoRA's B starts at zero, so its dropout only shows once B has trained."""
    trainer = trainer_for(cls, tmp_path, *stage, *dropout)
    for _ in range(2):
        metrics = trainer.train_step()
        assert metrics["train/first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-5)
        assert metrics["train/first_minibatch_approx_kl"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("dropout", [ATTENTION_DROPOUT, LORA_DROPOUT], ids=["attention", "lora"])
def test_dpo_starts_at_log2_with_dropout_in_the_model(tmp_path, dropout):
    trainer = trainer_for(DPOTrainer, tmp_path, "stage=dpo", *PAIRS, "stage.eval_examples=8", "stage.num_samples=0",
                          "hardware.micro_batch_size.dpo=2", "stage.lr=1e-6", *dropout)
    assert trainer.train_step()["train/loss"] == pytest.approx(math.log(2), abs=1e-5)


def two_train_mode_forwards_differ(trainer) -> bool:
    item = trainer.train_set[0]
    ids = torch.tensor([item.prompt_ids + getattr(item, "response_ids", getattr(item, "chosen_ids", []))])
    trainer.model.train()
    with torch.no_grad():
        return not torch.equal(trainer.model(input_ids=ids).logits, trainer.model(input_ids=ids).logits)


def test_sft_keeps_the_models_dropout_and_model_disable_dropout_overrides_either_way(tmp_path):
    assert two_train_mode_forwards_differ(trainer_for(SFTTrainer, tmp_path / "a", *ATTENTION_DROPOUT))
    assert not two_train_mode_forwards_differ(trainer_for(SFTTrainer, tmp_path / "b", *ATTENTION_DROPOUT,
                                                          "model.disable_dropout=true"))
    assert two_train_mode_forwards_differ(trainer_for(DPOTrainer, tmp_path / "c", "stage=dpo", *PAIRS,
                                                      "stage.num_samples=0", "hardware.micro_batch_size.dpo=2",
                                                      *ATTENTION_DROPOUT, "model.disable_dropout=false"))


def test_sft_end_to_end_with_dropout_on(tmp_path):
    run(tiny_config(tmp_path, *ATTENTION_DROPOUT, "stage.max_steps=3", "stage.lr=1e-3",
                    "stage.eval_every=3", "stage.num_samples=1"))
    client, runs = mlflow_runs(tmp_path / "mlflow.db")
    evals = [m.value for m in client.get_metric_history(runs[0].info.run_id, "eval/loss")]
    assert runs[0].info.status == "FINISHED" and evals[-1] < evals[0]


def test_disable_dropout_reaches_dropout_held_as_numbers_opt_style(tokenizer):
    """OPT keeps dropout, activation dropout and layerdrop as float attributes, not nn.Dropout modules."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf_exp.models.loading import disable_dropout

    config = AutoConfig.for_model("opt", vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                  num_attention_heads=4, word_embed_proj_dim=32, dropout=0.3, attention_dropout=0.3,
                                  activation_dropout=0.3, layerdrop=0.5)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
        disable_dropout(model)
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert model.training  # still in train mode: only the dropout is gone
