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
    """(train, val): whole prompts go to val, in a seed-fixed order, until it holds >= val_size rows. Train comes
    shuffled and val in the order of `prompt_position` (a hash of prompt and seed), so any prefix of val
    (stage.eval_examples) is a random draw of the held-out prompts, the same in every list that holds them,
    not the first rows of the file: HH-RLHF's file order is its subsets one after another, and the first 200
    held-out pairs were all harmless-base, whose chosen replies are the shorter refusals, scored against an RM
    that trained on the mixture (below chance, and falling as it learned)."""
    if val_size >= len(examples):
        raise ValueError(f"val_size={val_size} leaves no training data ({len(examples)} examples)")
    by_prompt: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        by_prompt.setdefault(_prompt_key(example.split_key), []).append(index)
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
    val.sort(key=lambda ex: prompt_position(ex.split_key, seed))  # stable: a prompt's rows stay in file order
    return train, val


def prompt_position(prompt: str, seed: int) -> float:
    """Where a prompt falls in [0, 1), fixed by the prompt and the seed alone: the same prompt lands in the
    same place in every data set of a pipeline (the SFT posts and the preference pairs of TL;DR share them)."""
    return int(hashlib.sha1(f"{seed}|{prompt}".encode("utf-8")).hexdigest()[:15], 16) / 16 ** 15


def split_by_phase(examples: Sequence[T], phase: str, shares: dict[str, float], held_out: float,
                   seed: int) -> tuple[list[T], list[T]]:
    """(train, val) of one pipeline phase, as DeepSpeed-Chat splits one data set 2:4:4 over SFT, RM and RL:
    prompts in the first `held_out` of [0, 1) are the evaluation prompts of every phase (no phase trains on
    them); the rest is cut in the order of `shares` ({"sft": 2, "rm": 4, "rl": 4}), and `phase`'s portion
    is its training data. Whole prompts move, so no prompt is in two phases. Train comes shuffled, val in
    `prompt_position` order: a prefix of val is a random draw, and the same prompts in every phase and kind."""
    names = list(shares)
    total = float(sum(shares.values()))
    start = sum(shares[n] for n in names[: names.index(phase)]) / total
    end = start + shares[phase] / total
    train, val = [], []
    for example in examples:
        where = prompt_position(example.split_key, seed)
        if where < held_out:
            val.append(example)
        elif start <= (where - held_out) / (1 - held_out) < end:
            train.append(example)
    random.Random(seed + 1).shuffle(train)
    val.sort(key=lambda ex: prompt_position(ex.split_key, seed))
    return train, val
