"""Statistics of evaluation (pure functions: tensors and lists in, numbers out): intervals, calibration,
win rates.

Win rates are judged per prompt and sample: a win is 1, a tie 1/2, a loss 0 (AlpacaEval's convention).
Length-controlled win rate follows AlpacaEval 2 (Dubois et al. 2024, "Length-Controlled AlpacaEval"):
a logistic regression of the win on the length difference, read off at a difference of zero, so a judge
that rewards length (the project's own GRPO run had one) does not make a longer policy look better.
Intervals: Wilson for plain win rates and accuracies, a paired bootstrap over prompts for the regression.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def std_from_sums(n: float, total: float, sum_sq: float) -> float:
    """The unbiased (torch.std's) standard deviation of n values from their sum and sum of squares: sums that add
    up over micro batches and ranks."""
    mean = total / n
    return (max(sum_sq - n * mean ** 2, 0.0) / max(n - 1, 1)) ** 0.5


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z = 1.96) Wilson score interval for a proportion; honest near 0, 1 and for small n."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def calibration_bins(prob_chosen: Sequence[float], num_bins: int = 10) -> list[dict]:
    """Reliability table for pairwise predictions.

    Each pair's prediction is the side with p >= 0.5, made with confidence max(p, 1 - p) in
    [0.5, 1]; it is right when p > 0.5 (the labelled chosen response won). Bins split
    [0.5, 1] evenly. Returns [{"lo", "hi", "count", "confidence", "accuracy"}] for non-empty bins.
    """
    width = 0.5 / num_bins
    bins = [{"lo": 0.5 + i * width, "hi": 0.5 + (i + 1) * width, "count": 0, "conf_sum": 0.0, "right": 0}
            for i in range(num_bins)]
    for p in prob_chosen:
        confidence = max(p, 1 - p)
        b = bins[min(int((confidence - 0.5) / width), num_bins - 1)]
        b["count"] += 1
        b["conf_sum"] += confidence
        b["right"] += p > 0.5
    return [{"lo": b["lo"], "hi": b["hi"], "count": b["count"], "confidence": b["conf_sum"] / b["count"],
             "accuracy": b["right"] / b["count"]} for b in bins if b["count"]]


def expected_calibration_error(table: Sequence[dict]) -> float:
    """ECE = sum over bins of |accuracy - confidence| weighted by the bin's share of pairs."""
    total = sum(b["count"] for b in table)
    return sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in table) if total else 0.0


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


def sampled_kl(policy_logp: torch.Tensor, reference_logp: torch.Tensor, lengths: torch.Tensor) -> tuple[float, float]:
    """(per sequence, per token) KL(policy || reference) estimated from the policy's own samples (k1:
    log p - log q, unbiased for samples drawn from p). Inputs [N]: each response's summed log-prob under
    the policy and under the reference, and its length in tokens."""
    difference = policy_logp.double() - reference_logp.double()
    tokens = float(lengths.sum())
    return float(difference.mean()), (float(difference.sum()) / tokens if tokens else float("nan"))


def mean_interval(values: torch.Tensor, z: float = 1.96) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` [N] with its 95% normal interval (mean +- z * sd / sqrt(N)); the
    sampled KL's, whose k1 terms are unbiased but may average below zero on few samples."""
    values = values.double()
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = z * float(values.std()) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def interval_text(value: float, low: float, high: float, digits: int = 3) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def accuracy_metrics(prefix: str, correct: int, n: int) -> dict[str, float]:
    low, high = wilson_interval(correct, n)
    return {prefix: correct / n if n else float("nan"), f"{prefix}_ci_low": low, f"{prefix}_ci_high": high}
