"""Batched sampling with the KV cache from left-padded prompts, drawing from a generator the caller owns.

Why not `model.generate`: it samples from the global random stream (`torch.multinomial` without a
generator), so anything else that draws from or reseeds that stream (dropout, an evaluation, a
library) changes a run's rollouts; on a GPU an evaluation's `torch.manual_seed` reset every CUDA
generator and training came to depend on how often it evaluated. Here every draw comes from the
`generator` passed in: a run's rollouts depend on its seed alone.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from transformers import DynamicCache
from tqdm.auto import tqdm

from rlhf_exp.data.collate import left_pad


def truncate_after_stop(tokens: Sequence[int], stop_token_ids: Sequence[int]) -> tuple[list[int], bool]:
    """(tokens up to and including the first stop token, whether one was found)."""
    tokens = list(tokens)
    for at, token in enumerate(tokens):
        if token in stop_token_ids:
            return tokens[: at + 1], True
    return tokens, False


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """[B, V] logits with everything outside the top k and the nucleus p set to -inf (HF's order: k, then p).

    top_k 0 and top_p 1 keep everything; the most likely token is always kept.
    """
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the more likely ones already reach top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def cache_keyword(model) -> str:
    """The name `model.forward` takes its KV cache by: transformers renamed `past_key_values` to `cache`
    (the old name is deprecated and goes in 5.40, inside the range this package allows)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], *, pad_token_id: int, stop_token_ids: Sequence[int],
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None, autocast=None, desc: str | None = None,
             repeats: int = 1) -> list[list[int]]:
    """Responses (ids, ending at the first stop token when there is one): `repeats` for each prompt,
    a prompt's adjacent; `desc`: show a progress bar (a step per new token) under that name.

    Prompts are left-padded; position ids follow the attention mask, so padding does not shift
    positions. Each prompt is read once and its KV cache copied for its `repeats` rows (GRPO's samples
    share their prompt). A row that has stopped leaves the batch (its cache rows are dropped), so the
    rest decode as a smaller batch; its later places hold pad tokens. `min_new_tokens` does not exist
    here (it forbids EOS).
    """
    if not prompts:
        return []
    device = next(model.parameters()).device
    batch = left_pad(prompts, pad_token_id)
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    position_ids = batch["position_ids"].to(device)
    stops = torch.tensor(list(stop_token_ids), device=device)
    rows = len(prompts) * repeats
    new_tokens = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    alive = torch.arange(rows, device=device)  # rows still sampling, in the order of the cache's rows
    past, produced = DynamicCache(config=model.config), 0  # filled in place by each forward
    cache = {cache_keyword(model): past}
    was_training = model.training
    model.eval()
    try:
        for step in tqdm(range(max_new_tokens), desc=desc, unit="token", leave=False, disable=desc is None):
            with autocast if autocast is not None else torch.autocast(device.type, enabled=False):
                # logits_to_keep=1: only the last position is sampled from; a prefill that projected every
                # prompt position held [B, prompt, V] logits (0.4 GB for 8 TL;DR prompts, 49k vocabulary)
                out = model(input_ids=input_ids, attention_mask=attention_mask if step == 0 else attention_mask[alive],
                            position_ids=position_ids, use_cache=True, logits_to_keep=1, **cache)
            last = out.logits[:, -1]
            if step == 0 and repeats > 1:
                past.batch_repeat_interleave(repeats)
                last, attention_mask, position_ids = (x.repeat_interleave(repeats, dim=0)
                                                      for x in (last, attention_mask, position_ids))
            logits = filter_logits(last.float() / temperature, top_k, top_p)
            token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)
            new_tokens[alive, step] = token
            produced = step + 1
            going = ~torch.isin(token, stops)
            if not bool(going.any()):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(rows, 1)], dim=1)
            input_ids, position_ids = token[:, None], position_ids[:, -1:] + 1
            if not bool(going.all()):  # drop the stopped rows from the batch and the cache
                keep = going.nonzero().squeeze(-1)
                past.batch_select_indices(keep)
                alive, input_ids, position_ids = alive[keep], input_ids[keep], position_ids[keep]
    finally:
        model.train(was_training)
    return [truncate_after_stop(row, stop_token_ids)[0] for row in new_tokens[:, :produced].tolist()]


def sample(model, prompt_ids: Sequence[Sequence[int]], samples: int, generation, *, pad_token_id: int,
           stop_token_ids: Sequence[int], generator: torch.Generator | None, autocast=None,
           desc: str | None = None) -> list[list[int]]:
    """`samples` responses per prompt (a prompt's samples adjacent) with the settings of `generation`
    (max_new_tokens, temperature, top_k, top_p: the stage's `generation` block)."""
    return generate(model, prompt_ids, repeats=samples, pad_token_id=pad_token_id, stop_token_ids=stop_token_ids,
                    max_new_tokens=generation.max_new_tokens, temperature=generation.temperature,
                    top_k=generation.top_k, top_p=generation.top_p, generator=generator, autocast=autocast,
                    desc=desc)
