"""Verifiable rewards for problems with an exact answer (data=arithmetic, data=gsm8k), written as TRL's reward
functions are, so they also run in TRL unchanged: `completions` (strings, or one-message lists for
conversational data) and the data row's `answer` column by name, one float per completion (None where a row
has no answer: not scored).

  math_reward    1 when the completion's final answer equals the row's `answer`, else 0
  format_reward  1 when the completion states its answer in a form `final_answer` reads explicitly: a bare
                 number, "#### <number>" (GSM8K's convention) or "\\boxed{<number>}", else 0
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any, Sequence

NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_NUMBER = re.compile(NUMBER)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_HASHES = re.compile(r"####\s*(" + NUMBER + ")")
_BARE = re.compile(r"\s*(" + NUMBER + r")\s*\.?\s*")


def completion_text(completion: Any) -> str:
    """A completion's text: itself, or a conversational completion's (a list of messages) last content."""
    if isinstance(completion, list):
        return str(completion[-1].get("content", "")) if completion else ""
    return str(completion)


def parse_number(text: str) -> Fraction | None:
    """"1,000" / "$18" / "-3.50" as an exact number; None when it is not one."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def final_answer(text: str) -> str | None:
    """The answer a completion gives: the last \\boxed{...}, else the number after the last "####", else the last
    number in the text; None when there is none."""
    for pattern in (_BOXED, _HASHES):
        found = pattern.findall(text)
        if found:
            return found[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def math_reward(completions: Sequence[Any], answer: Sequence[Any] | None = None, **_) -> list[float | None]:
    """1.0 when the completion's `final_answer` equals the row's `answer` as a number (GSM8K's "#### 72"
    understood in the answer too), else 0.0; None for a row without an answer."""
    if answer is None:
        raise ValueError("needs an `answer` column in the data (data=arithmetic, data=gsm8k, or a data set with one)")
    scores: list[float | None] = []
    for completion, expected in zip(completions, answer, strict=True):
        if expected is None:
            scores.append(None)
            continue
        expected_text = str(expected)
        target = parse_number(final_answer(expected_text) if "####" in expected_text else expected_text)
        given = final_answer(completion_text(completion))
        scores.append(float(target is not None and given is not None and parse_number(given) == target))
    return scores


def format_reward(completions: Sequence[Any], **_) -> list[float]:
    """1.0 when the completion states its answer explicitly (a bare number, "#### <number>" or \\boxed{}), else 0.0."""
    def explicit(text: str) -> bool:
        return bool(_BARE.fullmatch(text) or _HASHES.search(text) or _BOXED.search(text))

    return [float(explicit(completion_text(c))) for c in completions]
