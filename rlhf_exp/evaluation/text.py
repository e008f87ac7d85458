"""Text statistics of answers: ROUGE-L against references (rouge-score), distinct-n over all answers."""

from __future__ import annotations

from collections import Counter
from typing import Sequence


def words(text: str) -> list[str]:
    return text.lower().split()


def rouge_l(candidates: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (Lin 2004) of each candidate against its reference, computed as the summarization papers
    report it (Stiennon et al. 2020 and after): Google's rouge-score with its Porter stemmer on (lower-cased,
    split on anything not a letter or digit, so "mat." matches "mats")."""
    from rouge_score import rouge_scorer

    if not candidates:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return sum(scorer.score(reference, candidate)["rougeL"].fmeasure
               for candidate, reference in zip(candidates, references, strict=True)) / len(candidates)


def distinct_n(texts_as_tokens: Sequence[Sequence], n: int) -> float:
    """Distinct-n (Li et al. 2016): distinct n-grams / all n-grams over every response (1 = no n-gram
    repeats anywhere; collapse to one answer drives it down)."""
    grams: Counter = Counter()
    for tokens in texts_as_tokens:
        grams.update(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0
