"""Text statistics of answers (pure functions): ROUGE-L against references, distinct-n over all answers."""

from __future__ import annotations

from collections import Counter
from typing import Sequence


def words(text: str) -> list[str]:
    return text.lower().split()


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


def distinct_n(texts_as_tokens: Sequence[Sequence], n: int) -> float:
    """Distinct-n (Li et al. 2016): distinct n-grams / all n-grams over every response (1 = no n-gram
    repeats anywhere; collapse to one answer drives it down)."""
    grams: Counter = Counter()
    for tokens in texts_as_tokens:
        grams.update(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0
