"""GRPO on the tiny model: rollouts, rewards, the update's sanity checks, and the CLI."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import GRPO, VARIED, mlflow_runs, metric_history, run_cli, tiny_config, tracked_env, trainer_for
from rlhf_exp.rewards import keyword_reward, length_reward
from rlhf_exp.rollout.generation import truncate_after_stop
from rlhf_exp.stages.grpo import GRPOTrainer


def grpo_trainer(tmp_path, *overrides):
    return trainer_for(GRPOTrainer, tmp_path, *GRPO, *overrides)


def test_rule_rewards_and_eos_truncation():
    assert length_reward([], [], [[1] * 20, [1] * 10], target_tokens=20) == [0.0, -0.5]
    assert keyword_reward([], ["Thanks!", "no"], keyword="thanks") == [1.0, 0.0]
    assert truncate_after_stop([5, 2, 7, 2], stop_token_ids=[2]) == ([5, 2], True)
    assert truncate_after_stop([5, 7], stop_token_ids=[2]) == ([5, 7], False)
    assert truncate_after_stop([5, 9, 2], stop_token_ids=[2, 9]) == ([5, 9], True)  # EOS or a chat turn's end


def test_first_minibatch_ratio_is_one_and_every_minibatch_moves_the_weights(tmp_path):
    trainer = grpo_trainer(tmp_path, "stage.minibatch_size=4", "stage.updates_per_rollout=2", "stage.lr=1e-3", *VARIED)
    moved = []
    step = trainer.optimizer_step

    def checked_step():
        before = [p.detach().clone() for p in trainer.model.parameters()]
        out = step()
        moved.append(all(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters())))
        return out

    trainer.optimizer_step = checked_step
    metrics = trainer.train_step()
    assert metrics["train/first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["train/first_minibatch_approx_kl"] == pytest.approx(0.0, abs=1e-8)
    assert metrics["train/optimizer_steps"] == 4 and moved == [True] * 4  # 8 sequences / 4 x 2 passes
    for key in ("train/reward_mean", "train/kl_k3", "train/entropy", "train/clip_fraction", "train/approx_kl",
                "train/ratio_mean", "train/response_length", "train/eos_rate", "time/generation_s",
                "time/scoring_s", "time/update_s"):
        assert key in metrics, key


def test_a_single_update_takes_the_step_a_recomputed_rollout_would_and_skips_that_forward(tmp_path):
    """One pass, one minibatch: the update's own forward gives the old log-probs (no scoring pass). The
    step must equal the one taken with the old log-probs scored by a forward of their own."""
    reused = grpo_trainer(tmp_path / "a", "stage.minibatch_size=8", "stage.lr=1e-3", *VARIED)
    scored = grpo_trainer(tmp_path / "b", "stage.minibatch_size=8", "stage.lr=1e-3", *VARIED)
    calls = {"policy": 0}
    rollout_logprobs = reused.rollout_logprobs

    def counted(model, items):
        calls["policy"] += model is reused.model
        return rollout_logprobs(model, items)

    reused.rollout_logprobs = counted
    make_rollout = scored.make_rollout
    scored.make_rollout = lambda items, with_old_logps=True: make_rollout(items, with_old_logps=True)
    gradients = {}
    for name, trainer in (("reused", reused), ("scored", scored)):  # gradients, not weights: Adam's first
        step = trainer.optimizer_step                              # step turns rounding into full steps

        def captured(trainer=trainer, step=step, name=name):
            gradients[name] = torch.cat([p.grad.flatten() for p in trainer.model.parameters()])
            return step()
        trainer.optimizer_step = captured
    first, second = reused.train_step(), scored.train_step()
    assert calls["policy"] == 0 and first["train/optimizer_steps"] == 1
    for key in ("train/loss", "train/grad_norm", "train/kl_k3", "train/entropy"):
        assert first[key] == pytest.approx(second[key], rel=1e-5, abs=1e-7), key
    difference = (gradients["reused"] - gradients["scored"]).norm() / gradients["reused"].norm()
    assert gradients["reused"].norm() > 0 and difference < 1e-5


def test_grpo_cli_two_steps_tiny(tmp_path):
    """The issue's command."""
    out = run_cli("stage=grpo", "hardware=cpu", "stage.max_steps=2", "model=tiny", env=tracked_env(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    client, runs = mlflow_runs(tmp_path / "m.db")
    assert runs[0].info.status == "FINISHED"
    assert len(metric_history(client, runs[0], "train/reward_mean")) == 2
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "eval/reward_mean")] == [0, 2]


def test_a_minibatch_of_only_empty_responses_takes_no_optimizer_step(tmp_path):
    """Nothing to learn from: no Adam step (its momentum would still move the weights under torchrun,
    where missing gradients are summed as zeros) and no step of the lr schedule."""
    trainer = grpo_trainer(tmp_path, "stage.minibatch_size=4", *VARIED)
    trainer.sample = lambda prompt_ids, samples, model=None: [[] for _ in range(len(prompt_ids) * samples)]
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.train_step()
    assert metrics["train/optimizer_steps"] == 0 and trainer.scheduler.last_epoch == 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_the_reward_model_scorer_runs_on_the_policys_device_and_precision(tmp_path, tokenizer):
    from rlhf_exp.config import resolved
    from rlhf_exp.factory import build
    from rlhf_exp.models import load_causal_lm
    from rlhf_exp.models.reward import reward_model_from_causal_lm

    cfg = resolved(tiny_config(tmp_path))
    folder = tmp_path / "rm"
    reward_model_from_causal_lm(load_causal_lm(cfg.model, cfg.paths.cache_dir, tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg = resolved(tiny_config(tmp_path, "stage=grpo", "reward=reward_model", f"reward.fn.path={folder}",
                               "hardware.precision=bf16"))
    scorer = build(cfg.reward.fn, "reward.fn", cfg.allowed_targets)
    weights = next(scorer.model.parameters())
    assert weights.device.type == cfg.hardware.device and weights.dtype == torch.bfloat16
    scores = scorer(prompts=["a prompt"], completions=["a reply"])
    assert len(scores) == 1


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_without_a_kl_term_no_reference_is_held_or_run_unless_its_kl_is_asked_for(tmp_path, stage):
    """kl_coef=0 (TRL's default beta) still copied the policy into a reference and ran it on every rollout and
    evaluation, for nothing but train/kl_k3 and eval/kl_k3; now none is held, and report_kl=true holds one again."""
    from helpers import PPO, VARIED
    from rlhf_exp.planner import plan_run
    from rlhf_exp.stages.ppo import PPOTrainer

    cls, overrides = (GRPOTrainer, [*GRPO, *VARIED]) if stage == "grpo" else (PPOTrainer, PPO)
    trainer = trainer_for(cls, tmp_path, *overrides, "stage.kl_coef=0")
    assert trainer.reference is None
    assert "reference" not in {model for model, _, _ in plan_run(trainer.cfg).rows}
    metrics = {**trainer.train_step(), **trainer.evaluate()}
    assert "train/kl_k3" not in metrics and "eval/kl_k3" not in metrics and math.isfinite(metrics["train/loss"])
    trainer.close()
    asked = trainer_for(cls, tmp_path / "asked", *overrides, "stage.kl_coef=0", "stage.report_kl=true")
    assert asked.reference is not None
    metrics = asked.train_step()
    assert metrics["train/kl_k3"] >= 0
    asked.close()


def test_every_id_the_models_generation_config_ends_with_stops_a_rollout(tmp_path):
    """Sampling stopped only at the EOS and the template's end of turn: a model whose generation_config.json lists
    more (Qwen2.5-Instruct: <|im_end|> and <|endoftext|>) ran on past its own end to the length cap."""
    from transformers import GenerationConfig

    from rlhf_exp.config import resolved
    from rlhf_exp.models import load_causal_lm, load_tokenizer

    cfg = resolved(tiny_config(tmp_path))
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    model = load_causal_lm(cfg.model, cfg.paths.cache_dir, tokenizer)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    other_end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    GenerationConfig(eos_token_id=[tokenizer.eos_token_id, other_end]).save_pretrained(tmp_path / "model")
    trainer = trainer_for(GRPOTrainer, tmp_path, *GRPO, f"model.init_from={tmp_path / 'model'}")
    assert other_end in trainer.stop_token_ids and trainer.stop_token_ids[-1] == tokenizer.eos_token_id
    assert truncate_after_stop([5, 6, other_end, 7], trainer.stop_token_ids)[0] == [5, 6, other_end]
    trainer.close()
