"""PPO on the tiny model: the N+ sanity checks, every minibatch updates, options, and the CLI."""

from __future__ import annotations

import pytest
import torch

from helpers import PPO, mlflow_runs, metric_history, run_cli, tracked_env, trainer_for
from rlhf_exp.stages.ppo import PPOTrainer


def ppo_trainer(tmp_path, *overrides):
    return trainer_for(PPOTrainer, tmp_path, *PPO, *overrides)


def test_first_minibatch_ratio_is_one_and_every_minibatch_moves_policy_and_critic(tmp_path):
    trainer = ppo_trainer(tmp_path)
    moved, step = [], trainer.optimizer_step

    def checked_step():
        before = [p.detach().clone() for p in trainer.model.parameters()]
        out = step()
        changed = [not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters())]
        moved.append(sum(changed) / len(changed))
        return out

    trainer.optimizer_step = checked_step
    metrics = trainer.train_step()
    assert metrics["train/first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["train/first_minibatch_approx_kl"] == pytest.approx(0.0, abs=1e-7)
    assert metrics["train/optimizer_steps"] == 4  # 4 sequences / minibatch 2 x 2 epochs
    assert min(moved) > 0.95, moved  # (the critic's unused LM head is gone; all else moves)
    for key in ("train/value_loss", "train/policy_loss", "train/kl_k3", "train/entropy", "train/clip_fraction",
                "train/approx_kl", "train/eos_rate", "train/response_length", "time/generation_s"):
        assert key in metrics, key


def test_ptx_and_ema_options(tmp_path):
    trainer = ppo_trainer(tmp_path, "stage.ptx_coef=0.5", "stage.ema_decay=0.5")
    before = [p.detach().clone() for p in trainer.ema.parameters()]
    metrics = trainer.train_step()
    assert metrics["train/ptx_loss"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.ema.parameters()))
    assert trainer.eval_policy is trainer.ema
    folder = trainer.save_checkpoint(tmp_path / "ckpt")
    assert (folder / "ema" / "model.safetensors").is_file() and (folder / "critic" / "model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers == 2  # the actor loads as an LM


def test_ppo_cli_two_steps_tiny(tmp_path):
    out = run_cli("stage=ppo", "hardware=cpu", "stage.max_steps=2", "model=tiny", "stage.ppo_epochs=1",
                  env=tracked_env(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    client, runs = mlflow_runs(tmp_path / "m.db")
    assert runs[0].info.status == "FINISHED"
    assert len(metric_history(client, runs[0], "train/value_loss")) == 2


def test_ppo_ptx_is_refused_on_prompts_without_references_before_any_weights_load(tmp_path, monkeypatch):
    """Prompt-only rows have an empty reference, tokenized as [end]: the ptx term maximised log p(end | prompt)."""
    import json

    import pytest

    from rlhf_exp.errors import ConfigError
    from rlhf_exp.stages.toolbox import Toolbox

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} + {i}?"}) + "\n" for i in range(40)))
    monkeypatch.setattr(Toolbox, "load_policy", lambda self: pytest.fail("weights were read before the refusal"))
    with pytest.raises(ConfigError, match=r"stage.ptx_coef.*32 of 32 training prompts of file:.*prompts.jsonl have no reference"):
        ppo_trainer(tmp_path, "data=file", f"data.path={prompts}", "data.val_size=8", "stage.ptx_coef=0.5")


def test_a_critic_from_a_reward_model_of_another_vocabulary_is_refused(tokenizer):
    """The critic was fed the policy's token ids whatever the RM's tokenizer: with another vocabulary it read
    other tokens, silently. The RM's own added pad token does not count as a difference."""
    import pytest

    from rlhf_exp.errors import ConfigError
    from rlhf_exp.stages.ppo import check_same_vocabulary

    class Vocabulary:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    vocab = tokenizer.get_vocab()
    check_same_vocabulary(tokenizer, Vocabulary({**vocab, "<|rlhf_exp_pad|>": len(vocab)}))
    swapped = dict(vocab)
    first, second = sorted(vocab, key=vocab.get)[100:102]
    swapped[first], swapped[second] = vocab[second], vocab[first]
    with pytest.raises(ConfigError, match=r"stage.critic_init.*2 of its tokens have other ids.*critic_init=policy"):
        check_same_vocabulary(tokenizer, Vocabulary(swapped))
