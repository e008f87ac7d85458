"""Batched sampling with the KV cache from left-padded prompts."""

from __future__ import annotations

from typing import Sequence

import torch

from rlhf_exp.data.collate import left_pad


def truncate_after_eos(tokens: Sequence[int], eos_token_id: int) -> tuple[list[int], bool]:
    """(tokens up to and including the first EOS, whether an EOS was found)."""
    tokens = list(tokens)
    if eos_token_id in tokens:
        return tokens[: tokens.index(eos_token_id) + 1], True
    return tokens, False


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, do_sample: bool = True, autocast=None) -> list[list[int]]:
    """Responses (ids, ending at the first EOS when there is one) for each prompt.

    EOS and pad ids are passed explicitly, and `min_new_tokens` is never set (it forbids EOS).
    Position ids follow the attention mask, so left padding does not shift positions.
    """
    batch = left_pad(prompts, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with autocast if autocast is not None else torch.autocast("cpu", enabled=False):
            out = model.generate(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature if do_sample else None,
                top_k=top_k if do_sample else None, top_p=top_p if do_sample else None,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    finally:
        model.train(was_training)
    width = batch["input_ids"].shape[1]
    return [truncate_after_eos(row[width:].tolist(), tokenizer.eos_token_id)[0] for row in out]
