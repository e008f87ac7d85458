"""GRPO on the tiny model: rollouts, rewards, the update's sanity checks, and the CLI."""

from __future__ import annotations

import pytest
import torch

from conftest import mlflow_runs, run_cli, tiny_config, tracked_env
from rlhf_exp.app import resolved, run_dir_for
from rlhf_exp.rewards import keyword_reward, length_reward, score_completions
from rlhf_exp.rollout.generation import truncate_after_eos
from rlhf_exp.stages.grpo import GRPOTrainer
from rlhf_exp.tracking import Tracker

GRPO = ["stage=grpo", "stage.batch_size=2", "stage.samples_per_prompt=4", "stage.generation.max_new_tokens=6",
        "stage.eval_examples=4", "stage.num_samples=2", "data.max_prompt_tokens=48", "reward.fn.target_tokens=3"]


def varied_reward(prompts, completions, completion_ids, **_):
    """Differs between samples of a random model, so advantages are non-zero (a user function by `_target_`)."""
    return [(sum(ids) % 7) / 7.0 for ids in completion_ids]


VARIED = ["reward.fn._target_=test_grpo.varied_reward", "~reward.fn.target_tokens", "reward.missing_eos_score=null"]


def grpo_trainer(tmp_path, *overrides):
    cfg = resolved(tiny_config(tmp_path, *GRPO, *overrides))
    trainer = GRPOTrainer(cfg, Tracker(), run_dir_for(cfg))
    trainer.setup()
    return trainer


def test_missing_eos_score_replaces_the_reward_not_adds_to_it():
    rewards, raw = score_completions(length_reward, ["p", "p"], ["a b", "a b"], [[1, 2], [1, 2]],
                                     has_eos=[True, False], missing_eos_score=-1.0)
    assert raw.tolist() == pytest.approx([-0.9, -0.9])  # |2 - 20| / 20
    assert rewards.tolist() == pytest.approx([-0.9, -1.0])
    kept, _ = score_completions(length_reward, ["p"], ["a"], [[1]], has_eos=[False], missing_eos_score=None)
    assert kept.tolist() == pytest.approx([-0.95])


def test_rule_rewards_and_eos_truncation():
    assert length_reward([], [], [[1] * 20, [1] * 10], target_tokens=20) == [0.0, -0.5]
    assert keyword_reward([], ["Thanks!", "no"], keyword="thanks") == [1.0, 0.0]
    assert truncate_after_eos([5, 2, 7, 2], eos_token_id=2) == ([5, 2], True)
    assert truncate_after_eos([5, 7], eos_token_id=2) == ([5, 7], False)


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
    for key in ("train/reward_mean", "train/kl", "train/entropy", "train/clip_fraction", "train/approx_kl",
                "train/ratio_mean", "train/response_length", "train/eos_rate", "time/generation_s",
                "time/scoring_s", "time/update_s"):
        assert key in metrics, key


def test_single_update_reuses_the_rollout_logprobs(tmp_path):
    trainer = grpo_trainer(tmp_path, "stage.minibatch_size=8")
    metrics = trainer.train_step()
    assert metrics["train/optimizer_steps"] == 1 and metrics["train/ratio_mean"] == 1.0


def test_grpo_cli_two_steps_tiny(tmp_path):
    """The issue's command."""
    out = run_cli("stage=grpo", "hardware=cpu", "stage.max_steps=2", "model=tiny", env=tracked_env(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    client, runs = mlflow_runs(tmp_path / "m.db")
    assert runs[0].info.status == "FINISHED"
    assert len(client.get_metric_history(runs[0].info.run_id, "train/reward_mean")) == 2
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "eval/reward_mean")] == [0, 2]
