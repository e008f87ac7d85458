"""Tokenizing and padding.

Padding side is explicit per use: right for training, left for generation. Masks are built
from sequence lengths, never from `input_ids != pad_token_id`: SmolLM2 and Qwen use their
EOS token as pad, so such a mask would drop every EOS the model must learn to emit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rlhf_exp.data.formats import SFTExample


@dataclass(frozen=True)
class TokenizedSFT:
    prompt_ids: list[int]
    response_ids: list[int]


def tokenize_sft(example: SFTExample, tokenizer, max_prompt_tokens: int, max_response_tokens: int) -> TokenizedSFT:
    """Prompt ids (long prompts keep their end) and response ids + EOS (cut to the response cap)."""
    prompt_ids = tokenizer(example.prompt, add_special_tokens=False).input_ids[-max_prompt_tokens:]
    response_ids = tokenizer(example.completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return TokenizedSFT(prompt_ids, response_ids[:max_response_tokens])


def collate_sft(batch: Sequence[TokenizedSFT], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch.

    Returns (B = batch, T = longest prompt + response):
      input_ids      [B, T]  prompt, response, then pad
      attention_mask [B, T]  1 on real tokens
      response_mask  [B, T]  1 on response tokens (the ones the SFT loss is on)
    """
    lengths = [len(x.prompt_ids) + len(x.response_ids) for x in batch]
    width = max(lengths)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    response_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        p, n = len(item.prompt_ids), lengths[row]
        input_ids[row, :n] = torch.tensor(item.prompt_ids + item.response_ids)
        attention_mask[row, :n] = 1
        response_mask[row, p:n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded batch for generation: input_ids [B, T], attention_mask [B, T], position_ids [B, T]."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, width - len(seq):] = torch.tensor(list(seq))
            attention_mask[row, width - len(seq):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
