"""Deterministic, honest train / validation splits.

Split by prompt, not by row: HH-RLHF and TL;DR hold several rows per prompt, and a prompt
seen in training must never be scored as held-out.
"""

from __future__ import annotations

import hashlib
import random
from typing import Sequence, TypeVar

T = TypeVar("T")


def _prompt_key(prompt: str) -> str:
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()


def split_by_prompt(examples: Sequence[T], val_size: int, seed: int) -> tuple[list[T], list[T]]:
    """(train, val): whole prompts go to val, in a seed-fixed order, until it holds >= val_size rows."""
    if val_size >= len(examples):
        raise ValueError(f"val_size={val_size} leaves no training data ({len(examples)} examples)")
    by_prompt: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        by_prompt.setdefault(_prompt_key(example.prompt), []).append(index)
    keys = sorted(by_prompt)
    random.Random(seed).shuffle(keys)
    val_rows: set[int] = set()
    for key in keys:
        if len(val_rows) >= val_size:
            break
        val_rows.update(by_prompt[key])
    train = [ex for i, ex in enumerate(examples) if i not in val_rows]
    val = [ex for i, ex in enumerate(examples) if i in val_rows]
    random.Random(seed + 1).shuffle(train)
    return train, val
