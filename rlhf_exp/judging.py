"""How `stage=eval` compares policies (pure functions: tensors and lists in, numbers out).

Win rates are judged per prompt and sample: a win is 1, a tie 1/2, a loss 0 (AlpacaEval's convention).
Length-controlled win rate follows AlpacaEval 2 (Dubois et al. 2024, "Length-Controlled AlpacaEval"):
a logistic regression of the win on the length difference, read off at a difference of zero, so a judge
that rewards length (the project's own GRPO run had one) does not make a longer policy look better.
Intervals: Wilson for plain win rates, a paired bootstrap over prompts for the regression.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import torch

from rlhf_exp.metrics import wilson_interval


def win_scores(scores: torch.Tensor, against: torch.Tensor) -> torch.Tensor:
    """[N] 1 where `scores` beats `against`, 1/2 on a tie, 0 on a loss (both [N], paired)."""
    return (scores > against).float() + 0.5 * (scores == against).float()


def win_rate(wins: torch.Tensor) -> tuple[float, float, float]:
    """(rate, low, high): the mean of `wins` [N] with a 95% Wilson interval (a tie counts half a win)."""
    n = len(wins)
    if n == 0:
        return float("nan"), 0.0, 1.0
    low, high = wilson_interval(float(wins.sum()), n)
    return float(wins.mean()), low, high


def _logistic_fit(wins: torch.Tensor, x: torch.Tensor, l2: float = 1e-3, iterations: int = 25) -> torch.Tensor:
    """(a, b) of P(win) = sigmoid(a + b x), by Newton's method on the (weakly L2-regularized: a clean
    separation has no finite maximum) log-likelihood; fractional wins (ties) are fine. float64."""
    design = torch.stack([torch.ones_like(x), x], dim=1)              # [N, 2]
    theta = torch.zeros(2, dtype=torch.float64)
    for _ in range(iterations):
        p = torch.sigmoid(design @ theta)
        gradient = design.T @ (wins - p) - l2 * theta
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + l2 * torch.eye(2, dtype=torch.float64)
        step = torch.linalg.solve(hessian, gradient)
        theta = theta + step
        if float(step.abs().max()) < 1e-10:
            break
    return theta


def length_controlled_win_rate(wins: torch.Tensor, length_difference: torch.Tensor, resamples: int = 400,
                               seed: int = 0) -> tuple[float, float, float]:
    """(rate, low, high): the win rate the logistic regression of `wins` [N] on `length_difference` [N]
    (policy's length - the other's, in tokens) predicts at equal length, with a 95% paired bootstrap
    interval (prompts resampled with replacement, `resamples` times, from `seed`)."""
    n = len(wins)
    if n == 0:
        return float("nan"), 0.0, 1.0
    wins = wins.double()
    scale = float(length_difference.double().abs().mean()) or 1.0   # keeps Newton well conditioned
    x = length_difference.double() / scale

    def at_zero(rows: torch.Tensor) -> float:
        return float(torch.sigmoid(_logistic_fit(wins[rows], x[rows])[0]))

    generator = torch.Generator().manual_seed(seed)
    draws = sorted(at_zero(torch.randint(n, (n,), generator=generator)) for _ in range(resamples))
    low, high = draws[int(0.025 * resamples)], draws[min(resamples - 1, int(0.975 * resamples))]
    return at_zero(torch.arange(n)), low, high


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of `a` and `b` (O(len a x len b), one row kept)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for item in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if item == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: Sequence[str], reference: Sequence[str]) -> float:
    """ROUGE-L F1 (Lin 2004; beta = 1) of two token lists: the longest common subsequence's precision and
    recall. Lower-cased whitespace words in `stage=eval` (no stemming, unlike the rouge-score package)."""
    if not candidate or not reference:
        return 0.0
    common = lcs_length(candidate, reference)
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def words(text: str) -> list[str]:
    return text.lower().split()


def distinct_n(texts_as_tokens: Sequence[Sequence], n: int) -> float:
    """Distinct-n (Li et al. 2016): distinct n-grams / all n-grams over every response (1 = no n-gram
    repeats anywhere; collapse to one answer drives it down)."""
    grams: Counter = Counter()
    for tokens in texts_as_tokens:
        grams.update(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def sampled_kl(policy_logp: torch.Tensor, reference_logp: torch.Tensor, lengths: torch.Tensor) -> tuple[float, float]:
    """(per sequence, per token) KL(policy || reference) estimated from the policy's own samples (k1:
    log p - log q, unbiased for samples drawn from p). Inputs [N]: each response's summed log-prob under
    the policy and under the reference, and its length in tokens."""
    difference = policy_logp.double() - reference_logp.double()
    tokens = float(lengths.sum())
    return float(difference.mean()), (float(difference.sum()) / tokens if tokens else float("nan"))


def interval_text(value: float, low: float, high: float, digits: int = 3) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
