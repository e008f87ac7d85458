"""The critic-free algorithms beside GRPO (stage.loss_type: dr_grpo, dapo, gspo, gspo_token, rloo, reinforce_pp,
reinforce_pp_baseline): their pieces against values worked out by hand, the presets and their overrides, DAPO's
dynamic sampling, and one step of each on the tiny model. TRL parity: tests/test_trl_parity.py."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from helpers import GRPO, VARIED, trainer_for
from rlhf_exp.errors import ConfigError
from rlhf_exp.losses.policy import ADVANTAGE_ESTIMATORS, clipped_policy_loss, leave_one_out_advantages, \
    overlong_penalty
from rlhf_exp.rewards import Scores
from rlhf_exp.stages.grpo import VARIANTS, GRPOTrainer, checks, variant


def scores_at_end(scores, mask):
    """[B] scores on each response's last token, as the stage builds token rewards without a KL."""
    rewards = torch.zeros_like(mask)
    rewards[torch.arange(len(scores)), mask.sum(-1).long() - 1] = torch.tensor(scores)
    return rewards


# ----------------------------------------------------------------------------------------------- advantages

def test_rloo_subtracts_the_mean_of_the_other_samples():
    # rewards 1, 2, 3, 6: the others' means are 11/3, 10/3, 3, 2
    assert leave_one_out_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), 4).tolist() == pytest.approx(
        [1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages = ADVANTAGE_ESTIMATORS["rloo"](scores_at_end([1.0, 2.0, 3.0, 6.0], mask), mask, 4)
    assert advantages[0].tolist() == pytest.approx([-8 / 3, -8 / 3, 0.0])  # every token of a response, pads 0
    assert advantages[3].tolist() == pytest.approx([4.0, 4.0, 0.0])


def test_reinforce_pp_whitens_each_tokens_return_over_the_whole_batch():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    token_rewards = torch.tensor([[-0.1, -0.1, 0.9], [-0.2, 0.5, 0.0]])  # KL penalties, the score on the last
    returns = [0.7, 0.8, 0.9, 0.3, 0.5]  # each token's reward-to-go
    mean = sum(returns) / 5
    std = math.sqrt(sum((r - mean) ** 2 for r in returns) / 5)
    advantages = ADVANTAGE_ESTIMATORS["reinforce_pp"](token_rewards, mask, 1)
    assert advantages[mask.bool()].tolist() == pytest.approx([(r - mean) / std for r in returns], abs=1e-5)
    assert advantages[1, 2] == 0


def test_reinforce_pp_baseline_takes_the_group_mean_then_whitens_over_the_batch():
    mask = torch.ones(4, 2)
    advantages = ADVANTAGE_ESTIMATORS["reinforce_pp_baseline"](scores_at_end([1.0, 0.0, 0.5, 0.5], mask), mask, 2)
    # centred 0.5, -0.5, 0, 0 on 2 tokens each: mean 0, std sqrt(4 x 0.25 / 8)
    root2 = math.sqrt(2)
    assert advantages.flatten().tolist() == pytest.approx([root2, root2, -root2, -root2, 0, 0, 0, 0], abs=1e-4)


def test_group_mean_is_dr_grpos_and_grpo_divides_by_the_groups_std():
    mask = torch.ones(4, 1)
    rewards = scores_at_end([1.0, 0.0, 3.0, 3.0], mask)
    assert ADVANTAGE_ESTIMATORS["group_mean"](rewards, mask, 2).flatten().tolist() == [0.5, -0.5, 0.0, 0.0]
    std = math.sqrt(0.5)  # the unbiased std of (1, 0)
    assert ADVANTAGE_ESTIMATORS["grpo"](rewards, mask, 2).flatten().tolist() == pytest.approx(
        [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.0, 0.0])


# ----------------------------------------------------------------------------------------------- ratios and clips

def test_clip_higher_lets_a_good_tokens_ratio_grow_past_the_symmetric_bound():
    logps, old, advantage = torch.tensor([[math.log(1.25)]]), torch.zeros(1, 1), torch.ones(1, 1)
    symmetric, clipped = clipped_policy_loss(logps, old, advantage, 0.2)
    assert float(symmetric) == pytest.approx(-1.2) and bool(clipped)
    higher, clipped = clipped_policy_loss(logps, old, advantage, 0.2, clip_ratio_high=0.28)
    assert float(higher) == pytest.approx(-1.25) and not bool(clipped)
    low, _ = clipped_policy_loss(torch.tensor([[math.log(0.7)]]), old, -advantage, 0.2, clip_ratio_high=0.28)
    assert float(low) == pytest.approx(0.8)  # the low side is still 1 - 0.2


def test_gspo_clips_the_length_normalized_sequence_ratio_per_response():
    logps = torch.tensor([[0.1, 0.3], [0.2, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    advantages = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    loss, clipped = clipped_policy_loss(logps, torch.zeros(2, 2), advantages, 3e-4, clip_ratio_high=4e-4,
                                        level="sequence", mask=mask)
    ratio = math.exp(0.2)  # both responses: mean log-ratio 0.2
    assert loss[0].detach().tolist() == pytest.approx([-(1 + 4e-4)] * 2)  # A > 0: clipped at 1 + 4e-4
    assert float(loss[1, 0].detach()) == pytest.approx(ratio)  # A < 0: the larger, unclipped term
    assert clipped[0].all() and not clipped[1, 0]
    (loss * mask).sum().backward()
    # response 0 is clipped: no gradient; response 1 has one token: d exp(mean log-ratio) / d log pi = ratio / 1
    assert logps.grad.flatten().tolist() == pytest.approx([0.0, 0.0, ratio, 0.0])


def test_gspo_token_has_the_sequence_ratio_and_each_tokens_own_gradient():
    logps = torch.tensor([[0.1, 0.3]], requires_grad=True)
    loss, _ = clipped_policy_loss(logps, torch.zeros(1, 2), -torch.ones(1, 2), 3e-4, clip_ratio_high=4e-4,
                                  level="sequence_token", mask=torch.ones(1, 2))
    assert loss.detach().flatten().tolist() == pytest.approx([math.exp(0.2)] * 2)
    loss.sum().backward()
    assert logps.grad.flatten().tolist() == pytest.approx([math.exp(0.2)] * 2)  # not ratio / |y| as in sequence


def test_rloos_ratio_is_the_whole_responses_likelihood_ratio():
    logps = torch.tensor([[0.1, 0.3, 0.5]], requires_grad=True)
    loss, _ = clipped_policy_loss(logps, torch.zeros(1, 3), torch.ones(1, 3), 10.0, level="sequence_sum",
                                  mask=torch.tensor([[1.0, 1.0, 0.0]]))
    assert float(loss[0, 0].detach()) == pytest.approx(-math.exp(0.4))
    loss[0, 0].backward()
    assert logps.grad.flatten().tolist() == pytest.approx([-math.exp(0.4), -math.exp(0.4), 0.0])


def test_a_sequence_level_ratio_needs_the_mask():
    with pytest.raises(ValueError, match="needs the response mask"):
        clipped_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), level="sequence")


def test_dapos_overlong_penalty_grows_linearly_over_the_buffer():
    lengths = torch.tensor([10, 15, 16, 18, 20])
    assert overlong_penalty(lengths, 20, 5).tolist() == pytest.approx([0, 0, -0.2, -0.6, -1.0])
    assert overlong_penalty(lengths, 20, 5, factor=0.5).tolist() == pytest.approx([0, 0, -0.1, -0.3, -0.5])
    assert overlong_penalty(lengths, 20, 0).tolist() == [0.0] * 5


# ----------------------------------------------------------------------------------------------- presets

def stage_config(**keys):
    base = {"loss_type": "grpo", "clip_ratio": None, "clip_ratio_high": None, "advantage": None,
            "loss_aggregation": None, "importance_sampling_level": None, "kl_in_reward": None,
            "dynamic_sampling": None, "overlong_buffer": None}
    return OmegaConf.create({**base, **keys})


def test_a_loss_type_presets_its_algorithms_choices_and_an_explicit_key_wins():
    dapo = variant(stage_config(loss_type="dapo"))
    assert (dapo.clip_ratio, dapo.clip_ratio_high, dapo.loss_aggregation, dapo.dynamic_sampling,
            dapo.overlong_buffer) == (0.2, 0.28, "token-mean", True, 0.2)
    assert variant(stage_config(loss_type="dapo", dynamic_sampling=False)).dynamic_sampling is False
    assert variant(stage_config(loss_type="dapo", clip_ratio_high=0.3)).clip_ratio_high == 0.3
    gspo = variant(stage_config(loss_type="gspo"))
    assert (gspo.importance_sampling_level, gspo.clip_ratio, gspo.clip_ratio_high) == ("sequence", 3e-4, 4e-4)
    # clip_ratio set alone (a clip_ratio sweep) is symmetric, whatever the preset's upper side
    assert variant(stage_config(loss_type="gspo", clip_ratio=0.1)).clip_ratio_high is None
    rloo = variant(stage_config(loss_type="rloo"))
    assert (rloo.advantage, rloo.importance_sampling_level, rloo.kl_in_reward) == ("rloo", "sequence_sum", True)
    assert variant(stage_config(loss_type="grpo", advantage="rloo")).advantage == "rloo"
    assert set(VARIANTS) == {"grpo", "dr_grpo", "dapo", "gspo", "gspo_token", "rloo", "reinforce_pp",
                             "reinforce_pp_baseline"}


def test_dynamic_sampling_under_torchrun_is_refused_naming_the_key():
    cfg = OmegaConf.create({"stage": {**stage_config(loss_type="dapo"), "batch_size": 2, "samples_per_prompt": 4,
                                      "minibatch_size": 8}, "parallel": {"processes": 2}})
    with pytest.raises(ConfigError, match="stage.dynamic_sampling"):
        checks(cfg)


# ----------------------------------------------------------------------------------------------- on the tiny model

def fixed_scores(rounds: list[list[float]]):
    """A stand-in for the reward: each call returns the next round's rewards."""
    queue = list(rounds)

    def score(prompts, responses, rows):
        rewards = torch.tensor(queue.pop(0))
        return Scores(rewards, rewards.clone(), [True] * len(responses), ["x"] * len(responses))

    return score


def test_dynamic_sampling_drops_flat_groups_and_draws_more_prompts_until_the_batch_is_full(tmp_path, caplog):
    trainer = trainer_for(GRPOTrainer, tmp_path, *GRPO, "stage.loss_type=dapo", "stage.minibatch_size=8",
                          "stage.kl_coef=0")
    # round 1: the first group flat (all 1), the second varied; round 2: the first varied, the second flat
    trainer.score = fixed_scores([[1, 1, 1, 1, 0, 1, 0, 1], [0.5, 0, 1, 0, 2, 2, 2, 2]])
    prompts, responses, scores, stats = trainer.draw_groups({})
    assert stats == {"train/sampling_rounds": 2.0, "train/dropped_groups": 2.0}
    assert scores.rewards.tolist() == [0, 1, 0, 1, 0.5, 0, 1, 0]  # the varied groups, in the order drawn
    assert len(prompts) == 2 and len(responses) == 8

    capped = trainer_for(GRPOTrainer, tmp_path / "capped", *GRPO, "stage.loss_type=dapo", "stage.minibatch_size=8",
                         "stage.kl_coef=0", "stage.max_sampling_rounds=1")
    capped.score = fixed_scores([[1, 1, 1, 1, 0, 1, 0, 1]])
    _, _, scores, stats = capped.draw_groups({})
    assert stats["train/sampling_rounds"] == 1 and scores.rewards.tolist() == [0, 1, 0, 1, 1, 1, 1, 1]
    assert "kept 1 of 2 groups after 1 rollouts" in caplog.text


@pytest.mark.parametrize("loss_type", sorted(VARIANTS))
def test_each_algorithm_takes_a_finite_step_that_moves_the_policy(tmp_path, loss_type):
    trainer = trainer_for(GRPOTrainer, tmp_path, *GRPO, f"stage.loss_type={loss_type}", "stage.minibatch_size=8",
                          "stage.lr=1e-3", "stage.kl_coef=0.1", *VARIED)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.train_step()
    assert math.isfinite(metrics["train/loss"]) and metrics["train/optimizer_steps"] == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert ("train/non_score_reward" in metrics) == variant(trainer.stage).kl_in_reward
    assert ("train/overlong_penalty_mean" in metrics) == (loss_type == "dapo")


def test_a_generated_token_budget_ends_training_and_a_resumed_run_keeps_the_count(tmp_path):
    trainer = trainer_for(GRPOTrainer, tmp_path, *GRPO, "stage.minibatch_size=8", "stage.max_steps=10",
                          "stage.eval_every=null", "stage.max_generated_tokens=40")
    trainer.fit()
    per_step = 2 * 4 * 6  # prompts x samples x max_new_tokens: at most 48 a step, so 40 are reached in 1 or 2
    assert 1 <= trainer.step <= 2 and 40 <= trainer.generated_tokens <= trainer.step * per_step
    assert trainer.history["train/generated_tokens"][-1][1] == trainer.generated_tokens
    again = trainer_for(GRPOTrainer, tmp_path / "again", *GRPO)
    again.load_extra_state(trainer.extra_state())
    assert again.generated_tokens == trainer.generated_tokens
