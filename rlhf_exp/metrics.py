"""Evaluation statistics (pure functions, no torch): intervals and calibration."""

from __future__ import annotations

import math
from typing import Sequence


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
