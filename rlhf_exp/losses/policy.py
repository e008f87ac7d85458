"""Policy-gradient pieces for GRPO and PPO, as pure functions of tensors.

Shapes: B sequences (prompts x samples), T response tokens; `mask` [B, T] is 1 on real
response tokens. Log-probs must be taken at the sampling temperature.
"""

from __future__ import annotations

from typing import Callable

import torch

from rlhf_exp.registry import Registry

LOG_RATIO_CLAMP = 20.0  # |log ratio| before exp (verl's): exp(20) ~ 5e8 stays finite, 0 x ratio stays 0
# name -> per-token estimate of KL(policy || reference) from log r = log ref - log pi ([B, T] -> [B, T])
KL_ESTIMATORS = Registry("KL estimator")
# name -> ([B, T] per-token loss, mask, **sizes) -> scalar
LOSS_AGGREGATIONS = Registry("loss aggregation")
# name -> (token_rewards [B, T], mask [B, T], group_size) -> advantages [B, T]
ADVANTAGE_ESTIMATORS = Registry("advantage estimator")
# name -> (log_ratio [B, T] = log pi - log pi_old, mask [B, T]) -> the log importance ratio, [B, T] or [B, 1]
IMPORTANCE_SAMPLING_LEVELS = Registry("importance sampling level")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages (Shao et al. 2024, DeepSeekMath eq. 3 with outcome supervision).

    rewards [P * G], the G samples of each prompt adjacent -> [P * G]:
    (r - mean of its group) / (std of its group + eps). `scale_by_std=False` is Dr. GRPO
    (Liu et al. 2025), which drops the std to avoid weighting easy / hard prompts up.
    The std is the unbiased one (torch's default) and eps TRL's 1e-4, as in TRL (tests/test_trl_parity.py):
    a group whose rewards differ only by rounding gets advantages near 0, not of order 1.
    """
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, "Back to Basics", eq. 6; Kool et al. 2019): each sample's reward minus the
    mean of the other G - 1 samples of its prompt. rewards [P * G] -> [P * G]; equal to
    G / (G - 1) x (r - group mean), an unbiased baseline (it does not depend on the sample it judges)."""
    groups = rewards.view(-1, group_size)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def sequence_rewards(token_rewards: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B]: a response's total reward (its score, minus the KL in the reward where there is one)."""
    return token_rewards.sum(-1)


def _broadcast(per_sequence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return per_sequence[:, None] * mask


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO: (R - group mean) / (group std + eps), the same on every token of a response."""
    return _broadcast(group_advantages(sequence_rewards(token_rewards), group_size, True), mask)


@ADVANTAGE_ESTIMATORS.register("group_mean")
def group_mean_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): R - group mean, no division by the group's std."""
    return _broadcast(group_advantages(sequence_rewards(token_rewards), group_size, False), mask)


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: R minus the mean of the prompt's other samples."""
    return _broadcast(leave_one_out_advantages(sequence_rewards(token_rewards), group_size), mask)


@ADVANTAGE_ESTIMATORS.register("reinforce_pp")
def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE++ (Hu 2025, sec. 3; OpenRLHF's and verl's `reinforce_plus_plus`): each token's return (the sum of
    the token rewards from it to the end, gamma = 1: the score and the KL penalties still ahead), whitened over
    every token of the whole batch, not per group."""
    returns = token_rewards.flip(-1).cumsum(-1).flip(-1) * mask
    return whiten(returns, mask)


@ADVANTAGE_ESTIMATORS.register("reinforce_pp_baseline")
def reinforce_pp_baseline_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE++-baseline (Hu 2025; verl's `reinforce_plus_plus_baseline`): R minus its group's mean, then
    whitened over every token of the batch (the group removes the prompt's difficulty, the batch the scale)."""
    centred = group_advantages(sequence_rewards(token_rewards), group_size, scale_by_std=False)
    return whiten(_broadcast(centred, mask), mask)


def flat_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[P] True where all G rewards of a prompt's group are equal (rewards [P * G]): its advantages are all 0,
    so the group teaches nothing (e.g. every sample missed EOS and got reward.missing_eos_score)."""
    groups = rewards.view(-1, group_size)
    return (groups == groups[:, :1]).all(dim=1)


@KL_ESTIMATORS.register("k1")
def k1(log_ratio: torch.Tensor, **_) -> torch.Tensor:
    return -log_ratio


@KL_ESTIMATORS.register("k2")
def k2(log_ratio: torch.Tensor, **_) -> torch.Tensor:
    return 0.5 * log_ratio.pow(2)


@KL_ESTIMATORS.register("k3")
def k3(log_ratio: torch.Tensor, k3_max: float = 10.0, **_) -> torch.Tensor:
    return (torch.exp(log_ratio) - 1 - log_ratio).clamp(max=k3_max)


def with_k2_gradient(estimator: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`estimator`'s value with k2's gradient, through a straight-through term (verl's `kl_penalty`)."""

    def straight_through(log_ratio: torch.Tensor, **options) -> torch.Tensor:
        straight = k2(log_ratio)
        return straight - straight.detach() + estimator(log_ratio, **options).detach()

    return straight_through


KL_ESTIMATORS.register("k1+")(with_k2_gradient(k1))
KL_ESTIMATORS.register("k3+")(with_k2_gradient(k3))
# as a loss on the policy's own samples: plain k1's expected gradient is zero (`kl_penalty`)
KL_LOSS_ESTIMATORS = tuple(name for name in KL_ESTIMATORS if name != "k1")


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k3",
               clamp: float = LOG_RATIO_CLAMP, k3_max: float = 10.0) -> torch.Tensor:
    """Per-token estimates of KL(policy || reference) from samples of the policy (Schulman 2020, "Approximating
    KL divergence"). logps, ref_logps [B, T] -> [B, T], with log r = ref_logps - logps clamped to +-clamp:
      k1 = -log r            (unbiased, high variance, can be negative)
      k2 = (log r)^2 / 2     (biased, low variance)
      k3 = r - 1 - log r     (unbiased, low variance, >= 0), capped at k3_max as verl does: r grows
                             as e^log r, so one token the reference finds far likelier would swamp a batch
      k1+, k3+               k1's or k3's value with k2's gradient, through a straight-through term (verl's
                             `kl_penalty`): the value to report, the gradient to follow

    Their values all estimate KL(policy || reference). As a loss (GRPO's kl_coef term), differentiated through
    log pi of the sampled tokens only, their expected gradients differ:
      k1: E_pi[grad log pi] = 0, only noise (right as a penalty in PPO's reward, wrong as a loss)
      k2, k1+, k3+: exactly grad KL(policy || reference)
      k3: grad KL(reference || policy), the reverse KL (what TRL's GRPO and the DeepSeekMath paper use)
    The estimators are the KL_ESTIMATORS registry: a new one is a decorated function of log r.
    """
    return KL_ESTIMATORS.lookup(estimator)((ref_logps - logps).clamp(-clamp, clamp), k3_max=k3_max)


@IMPORTANCE_SAMPLING_LEVELS.register("token")
def token_level(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PPO's and GRPO's per-token ratio pi / pi_old. [B, T] -> [B, T]."""
    return log_ratio


@IMPORTANCE_SAMPLING_LEVELS.register("sequence")
def sequence_level(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO (Zheng et al. 2025, eq. 7): one ratio per response, the geometric mean of its tokens' ratios,
    (pi(y|x) / pi_old(y|x))^(1/|y|), so clipping drops whole responses. [B, T] -> [B, 1]."""
    return masked_mean(log_ratio, mask, dim=-1)[:, None]


@IMPORTANCE_SAMPLING_LEVELS.register("sequence_token")
def sequence_token_level(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO-token (Zheng et al. 2025, eq. 13): each token's value is the sequence ratio, its gradient the token's
    own (sg[s] x pi_t / sg[pi_t]), so token-level advantages can be used. [B, T] -> [B, T]."""
    return log_ratio - log_ratio.detach() + sequence_level(log_ratio, mask).detach()


@IMPORTANCE_SAMPLING_LEVELS.register("sequence_sum")
def sequence_sum_level(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The whole response's likelihood ratio pi(y|x) / pi_old(y|x), unnormalized (TRL's RLOOTrainer). [B, T] -> [B, 1]."""
    return (log_ratio * mask).sum(-1, keepdim=True)


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                        clip_ratio: float = 0.2, dual_clip_c: float | None = None, *,
                        clip_ratio_high: float | None = None, level: str = "token",
                        mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), optionally dual-clipped, clip-higher, sequence-level.

    logps, old_logps [B, T]; advantages [B, T] (or [B, 1], broadcast) -> (loss [B, T], clipped [B, T]).
    With ratio = exp(log-ratio), the log-ratio clamped to +-20 (verl's; an overflowed ratio times a flat
    group's zero advantage was NaN): loss = max(-A ratio, -A clip(ratio, 1 - e_low, 1 + e_high)).
    e_high = clip_ratio_high, else clip_ratio: a larger e_high is DAPO's clip-higher (Yu et al. 2025, eq. 10),
    which leaves room for unlikely tokens' probabilities to grow and keeps entropy from collapsing.
    `level` (IMPORTANCE_SAMPLING_LEVELS; `mask` [B, T] needed for all but token) is where the ratio is taken:
    token (PPO, GRPO), sequence / sequence_token (GSPO: the length-normalized sequence ratio, then clipped
    per response), sequence_sum (TRL's RLOO: the whole response's likelihood ratio).
    Dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games", eq. 5): where A < 0 the
    loss is also capped at -A c (c > 1), so a huge ratio on a bad action cannot blow up the step.
    `clipped` marks tokens where a clip decided the loss (for the clip fraction).
    """
    if level != "token" and mask is None:
        raise ValueError(f"importance sampling level {level!r} needs the response mask")
    log_ratio = IMPORTANCE_SAMPLING_LEVELS.lookup(level)(logps - old_logps, mask)
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # no inf: 0 x inf = NaN
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_ratio, 1 + high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    if dual_clip_c is not None:
        cap = -advantages * dual_clip_c
        capped = (advantages < 0) & (loss > cap)
        loss = torch.where(advantages < 0, torch.minimum(loss, cap), loss)
        was_clipped = was_clipped | capped
    shape = torch.broadcast_shapes(loss.shape, logps.shape)
    return loss.expand(shape), was_clipped.expand(shape)


def overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the reward: 0 up to max_tokens - buffer
    tokens, then falling linearly to -factor at the cap, so a response that runs long is told so before it is
    cut off. lengths [B] (response tokens) -> [B]."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    exceed = lengths.float() - (max_tokens - buffer)
    return (-exceed / buffer * factor).clamp(max=0.0)


@LOSS_AGGREGATIONS.register("token-mean")
def token_mean(loss: torch.Tensor, mask: torch.Tensor, *, num_tokens: float | None = None, **_) -> torch.Tensor:
    return (loss * mask).sum() / (mask.sum().clamp(min=1) if num_tokens is None else num_tokens)


def _sequence_mean(per_sequence: torch.Tensor, num_sequences: float | None) -> torch.Tensor:
    return per_sequence.sum() / (len(per_sequence) if num_sequences is None else num_sequences)


@LOSS_AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(loss: torch.Tensor, mask: torch.Tensor, *, num_sequences: float | None = None,
                        **_) -> torch.Tensor:
    return _sequence_mean((loss * mask).sum(-1) / mask.sum(-1).clamp(min=1), num_sequences)


@LOSS_AGGREGATIONS.register("seq-mean-token-sum")
def seq_mean_token_sum(loss: torch.Tensor, mask: torch.Tensor, *, num_sequences: float | None = None,
                       **_) -> torch.Tensor:
    return _sequence_mean((loss * mask).sum(-1), num_sequences)


@LOSS_AGGREGATIONS.register("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(loss: torch.Tensor, mask: torch.Tensor, *, max_tokens: int | None = None,
                            num_sequences: float | None = None, **_) -> torch.Tensor:
    if not max_tokens:
        raise ValueError("seq-mean-token-sum-norm needs max_tokens (the generation budget)")
    return _sequence_mean((loss * mask).sum(-1) / max_tokens, num_sequences)


def aggregate_loss(loss: torch.Tensor, mask: torch.Tensor, mode: str = "seq-mean-token-mean", *,
                   max_tokens: int | None = None, num_sequences: float | None = None,
                   num_tokens: float | None = None) -> torch.Tensor:
    """[B, T] per-token loss -> scalar (verl's names; the LOSS_AGGREGATIONS registry).

    token-mean               sum over all tokens / number of tokens (DAPO: long responses weigh more)
    seq-mean-token-mean      mean over sequences of each sequence's token mean (the GRPO paper; a short
                             response's tokens weigh more: the length bias Dr. GRPO points out)
    seq-mean-token-sum       mean over sequences of each sequence's token sum
    seq-mean-token-sum-norm  mean over sequences of token sum / max_tokens, a constant (Dr. GRPO, Liu et al.
                             2025, with the generation budget as the constant; verl divides the batch's sum)
    When `loss` is one micro batch of a larger minibatch, pass the minibatch's `num_sequences` /
    `num_tokens`: the micro batches' results then add up to the minibatch's.
    """
    return LOSS_AGGREGATIONS.lookup(mode)(loss, mask, max_tokens=max_tokens, num_sequences=num_sequences,
                                          num_tokens=num_tokens)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (N+ implementation details: whiten advantages)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16), right-padded responses.

    rewards, values, mask [B, T] -> (advantages [B, T], returns = advantages + values [B, T]).
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}; beyond a response's
    last token V and A are 0.
    """
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        live = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * live
        next_value = values[:, t] * live
        next_advantage = advantage * live
    return advantages, (advantages + values) * mask


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float = 0.2) -> torch.Tensor:
    """PPO value loss with the value clipped around the rollout's (N+ detail; OpenAI baselines).

    [B, T] -> [B, T]: 0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2).
    """
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """PPO's per-token reward (Ziegler et al. 2019; InstructGPT): -kl_coef x KL on every token,
    plus the sequence score on the last real response token (the EOS, not the pad after it).

    scores [B], kl [B, T] (a per-token estimate, k1 in the N+ recipe), mask [B, T] -> [B, T].
    """
    rewards = -kl_coef * kl * mask
    last = mask.sum(-1).long() - 1
    rows = torch.nonzero(last >= 0).squeeze(-1)  # an empty response has no token to carry its score
    rewards[rows, last[rows]] += scores[rows]
    return rewards
