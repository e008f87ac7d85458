"""GRPO / PPO building blocks against values derived by hand, and GAE against a plain loop."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_exp.losses.policy import (aggregate_loss, clipped_policy_loss, clipped_value_loss, gae, group_advantages,
                                    kl_penalty, whiten)


def losses_for(ratio: float, advantage: float, dual_clip_c=None):
    logps = torch.tensor([[math.log(ratio)]])
    loss, clipped = clipped_policy_loss(logps, torch.zeros(1, 1), torch.tensor([[advantage]]), 0.2, dual_clip_c)
    return loss.item(), clipped.item()


@pytest.mark.parametrize(("ratio", "advantage", "expected", "clipped"), [
    (1.5, 1.0, -1.2, True),    # A > 0, ratio above 1 + e: the clip caps the gain
    (0.5, 1.0, -0.5, False),   # A > 0, ratio below 1 - e: pessimistic max keeps -A ratio
    (5.0, -1.0, 3.0, True),    # A < 0, huge ratio: dual clip caps the loss at -A c = 3
    (2.0, -1.0, 2.0, False),   # A < 0, ratio 2 < c: plain PPO, max(2, 1.2)
    (0.5, -1.0, 0.8, True),    # A < 0, ratio below 1 - e: clipped term 0.8 wins
    (1.0, -2.0, 2.0, False),   # ratio 1: the loss is -A
])
def test_dual_clip_by_hand(ratio, advantage, expected, clipped):
    loss, was_clipped = losses_for(ratio, advantage, dual_clip_c=3.0)
    assert loss == pytest.approx(expected) and was_clipped == clipped


def test_without_dual_clip_a_negative_advantage_is_not_capped():
    assert losses_for(5.0, -1.0)[0] == pytest.approx(5.0)


def test_kl_estimators_by_hand():
    logps, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])  # log r = log(1/2)
    assert kl_penalty(logps, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(logps, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_penalty(logps, ref, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))
    same = torch.tensor([-1.0, -3.0])
    for estimator in ("k1", "k2", "k3"):
        assert torch.all(kl_penalty(same, same, estimator) == 0)
    assert kl_penalty(torch.tensor([0.0]), torch.tensor([-100.0]), "k3").isfinite().all()  # clamped at 20
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(same, same, "k4")
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(same, same, "k2+")


@pytest.mark.parametrize(("estimator", "expected_gradient"), [
    ("k1", "zero"), ("k2", "forward"), ("k3", "reverse"), ("k1+", "forward"), ("k3+", "forward")])
def test_kl_estimators_expected_gradients_by_exact_enumeration(estimator, expected_gradient):
    """Over a 6-token softmax policy, E_{x~pi}[grad estimator(x)] (the gradient through log pi(x) only, as a loss
    on the policy's own samples is differentiated) summed exactly over x: k1's is zero (it only adds noise, so a
    kl_coef sweep with k1 shows nothing), k3's is the gradient of KL(ref || pi), k2's, k1+'s and k3+'s that of
    KL(pi || ref). The docstring said k3 gave KL(pi || ref)'s."""
    generator = torch.Generator().manual_seed(0)
    theta = torch.randn(6, generator=generator, dtype=torch.float64).requires_grad_(True)
    ref = torch.log_softmax(torch.randn(6, generator=generator, dtype=torch.float64), 0)
    logp = torch.log_softmax(theta, 0)
    pi = logp.exp().detach()
    values = kl_penalty(logp, ref, estimator)  # one estimate per possible sampled token
    (grad,) = torch.autograd.grad((pi * values).sum(), theta, retain_graph=True)
    forward_kl = (logp.exp() * (logp - ref)).sum()
    reverse_kl = (ref.exp() * (ref - logp)).sum()
    target = {"zero": torch.zeros(6, dtype=torch.float64),
              "forward": torch.autograd.grad(forward_kl, theta, retain_graph=True)[0],
              "reverse": torch.autograd.grad(reverse_kl, theta, retain_graph=True)[0]}[expected_gradient]
    assert torch.allclose(grad, target, atol=1e-12), (grad, target)
    assert grad.abs().max() > 1e-3 or expected_gradient == "zero"
    # whatever the gradient, every estimator but k2 is unbiased for the value of KL(pi || ref)
    if estimator != "k2":
        assert (pi * values.detach()).sum().item() == pytest.approx(forward_kl.item(), abs=1e-12)


def test_grpo_refuses_plain_k1_as_a_loss(tmp_path):
    from helpers import tiny_config
    from rlhf_exp.config import validate
    from rlhf_exp.errors import ConfigError

    with pytest.raises(ConfigError, match=r"stage.kl_estimator.*k1\+ keeps its value"):
        validate(tiny_config(tmp_path, "stage=grpo", "stage.kl_estimator=k1"))
    validate(tiny_config(tmp_path, "stage=grpo", "stage.kl_estimator=k1+"))


def test_an_overflowed_ratio_times_a_zero_advantage_is_zero_not_nan():
    """A flat group (advantage 0) with a log-ratio past exp's range gave 0 x inf = NaN; the log-ratio is clamped
    at +-20 before exp, as verl does."""
    logps, old = torch.tensor([[100.0, -100.0, 0.5]]), torch.zeros(1, 3)
    loss, _ = clipped_policy_loss(logps.requires_grad_(True), old, torch.zeros(1, 3), 0.2, 3.0)
    assert torch.isfinite(loss).all() and torch.equal(loss.detach(), torch.zeros(1, 3))
    loss.sum().backward()
    assert torch.isfinite(logps.grad).all()
    ratio_loss, _ = clipped_policy_loss(torch.tensor([[0.5]]), torch.zeros(1, 1), torch.tensor([[1.0]]), 10.0)
    assert ratio_loss.item() == pytest.approx(-math.exp(0.5))  # within the clamp nothing changes


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    adv = group_advantages(rewards, group_size=3, eps=0.0)
    s = math.sqrt(12.0)  # unbiased std of (0, 0, 6)
    assert adv.tolist() == pytest.approx([-1.0, 0.0, 1.0, -2 / s, -2 / s, 4 / s])
    assert group_advantages(rewards, 3, scale_by_std=False).tolist() == pytest.approx([-1, 0, 1, -2, -2, 4])
    assert torch.all(group_advantages(torch.ones(4), 4) == 0)  # a group that agrees teaches nothing


def test_aggregation_modes_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)


def test_whitening_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = whiten(values, mask, eps=0.0)
    k = 1 / math.sqrt(2 / 3)
    assert out.tolist()[0] == pytest.approx([-k, 0.0, k, 0.0])


def gae_by_plain_loop(rewards, values, lengths, gamma, lam):
    out = []
    for r, v, n in zip(rewards.tolist(), values.tolist(), lengths):
        adv = [0.0] * len(r)
        last = 0.0
        for t in reversed(range(n)):
            next_v = v[t + 1] if t + 1 < n else 0.0
            last = r[t] + gamma * next_v - v[t] + gamma * lam * last
            adv[t] = last
        out.append(adv)
    return torch.tensor(out)


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0)])
def test_gae_matches_a_plain_loop(gamma, lam):
    torch.manual_seed(0)
    lengths = [5, 2, 7]
    mask = torch.tensor([[1.0] * n + [0.0] * (7 - n) for n in lengths])
    rewards, values = torch.randn(3, 7) * mask, torch.randn(3, 7) * mask
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(advantages, gae_by_plain_loop(rewards, values, lengths, gamma, lam), atol=1e-6)
    assert torch.allclose(returns, (advantages + values) * mask)


def test_gae_with_lambda_1_and_gamma_1_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.1]])
    advantages, _ = gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    assert advantages.tolist()[0] == pytest.approx([0.5, 0.8, 0.9])


def test_clipped_value_loss_by_hand():
    loss = clipped_value_loss(torch.tensor([1.5]), torch.tensor([1.0]), torch.tensor([2.0]), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.2 - 2.0) ** 2)  # the clipped value is further from R
    inside = clipped_value_loss(torch.tensor([1.1]), torch.tensor([1.0]), torch.tensor([2.0]), clip=0.2)
    assert inside.item() == pytest.approx(0.5 * 0.9 ** 2)


def test_ppo_score_lands_on_the_last_real_token_minus_the_kl_penalty():
    from rlhf_exp.losses.policy import per_token_rewards

    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 9.0, 9.0]])
    rewards = per_token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.1, 2.0 - 0.15], [-1.0 - 0.25, 0.0, 0.0]]))


def test_dr_grpo_aggregations_by_hand():
    """verl's names: a sequence's token sum, averaged over sequences; Dr. GRPO divides by a constant
    (the generation budget) instead of each response's length, which is the length bias it removes."""
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm", max_tokens=8).item() == pytest.approx((6 + 4) / 8 / 2)
    with pytest.raises(ValueError, match="max_tokens"):
        aggregate_loss(loss, mask, "seq-mean-token-sum-norm")


def test_seq_mean_token_mean_weighs_short_responses_up_and_dr_grpo_does_not():
    """The same per-token loss on a long and a short response: a per-sequence mean gives each token of
    the short one 3x the weight; Dr. GRPO's constant normalizer gives every token the same weight."""
    per_token = torch.ones(2, 3, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    grad, = torch.autograd.grad(aggregate_loss(per_token, mask, "seq-mean-token-mean"), per_token)
    assert grad[1, 0] == pytest.approx(3 * grad[0, 0])
    grad, = torch.autograd.grad(aggregate_loss(per_token, mask, "seq-mean-token-sum-norm", max_tokens=3), per_token)
    assert grad[1, 0] == pytest.approx(grad[0, 0])


def test_k3_value_is_clamped_like_verl():
    """A token the reference finds e^15 times likelier gives k3 = e^15 - 16 ~ 3.3M: one such token
    would swamp the batch's loss. verl clamps the k3 value to 10."""
    k3 = kl_penalty(torch.tensor([0.0]), torch.tensor([15.0]), "k3")
    assert k3.item() == pytest.approx(10.0)
    assert kl_penalty(torch.tensor([0.0]), torch.tensor([1.0]), "k3").item() == pytest.approx(math.e - 2)


def test_flat_groups_are_the_groups_without_a_learning_signal():
    from rlhf_exp.losses.policy import flat_groups

    rewards = torch.tensor([-1.0, -1.0, -1.0, 0.2, -1.0, 0.2, 0.5, 0.5, 0.5])
    assert flat_groups(rewards, 3).tolist() == [True, False, True]
    # exactly the groups whose advantages are all zero
    assert (group_advantages(rewards, 3).view(3, 3) == 0).all(dim=1).tolist() == [True, False, True]
