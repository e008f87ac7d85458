"""Tokenizing and padding.

Padding side is explicit per use: right for training, left for generation. Masks are built
from sequence lengths, never from `input_ids != pad_token_id`: SmolLM2 and Qwen use their
EOS token as pad, so such a mask would drop every EOS the model must learn to emit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from rlhf_exp.data import tokens
from rlhf_exp.data.disk_cache import digest, read_json, tokenizer_hash, write_json
from rlhf_exp.data.formats.base import LabelledExample, PreferenceExample, SFTExample
from rlhf_exp.data.tokens import encode_prompt


@dataclass(frozen=True)
class TokenizedSFT:
    prompt_ids: list[int]
    response_ids: list[int]


def tokenize_sft(example: SFTExample, tokenizer, max_prompt_tokens: int, max_response_tokens: int,
                 end_id: int | None = None) -> TokenizedSFT:
    """Prompt ids (`encode_prompt`) and response ids + `end_id` (EOS by default; a chat turn's end for
    chat data), cut to the response cap."""
    return TokenizedSFT(encode_prompt(example.prompt, tokenizer, max_prompt_tokens),
                        _response_ids(example.completion, tokenizer, max_response_tokens, end_id))


def _response_ids(text: str, tokenizer, max_response_tokens: int, end_id: int | None = None) -> list[int]:
    end = tokenizer.eos_token_id if end_id is None else end_id
    return (tokenizer(text, add_special_tokens=False).input_ids + [end])[:max_response_tokens]


def collate_sft(batch: Sequence[TokenizedSFT], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch.

    Returns (B = batch, T = longest prompt + response):
      input_ids      [B, T]  prompt, response, then pad
      attention_mask [B, T]  1 on real tokens
      response_mask  [B, T]  1 on response tokens (the ones the SFT loss is on)
      lengths        [B]     real tokens per row (the last one, at lengths - 1, is the EOS)
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
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
            "lengths": torch.tensor(lengths, dtype=torch.long)}


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    @property
    def chosen(self) -> TokenizedSFT:
        return TokenizedSFT(self.prompt_ids, self.chosen_ids)

    @property
    def rejected(self) -> TokenizedSFT:
        return TokenizedSFT(self.prompt_ids, self.rejected_ids)


def tokenize_pair(example: PreferenceExample, tokenizer, max_prompt_tokens: int,
                  max_response_tokens: int, end_id: int | None = None) -> TokenizedPair:
    """Prompt, chosen + end and rejected + end, capped as in `tokenize_sft` (the prompt tokenized once)."""
    chosen = tokenize_sft(SFTExample(example.prompt, example.chosen), tokenizer, max_prompt_tokens,
                          max_response_tokens, end_id)
    rejected_ids = _response_ids(example.rejected, tokenizer, max_response_tokens, end_id)
    return TokenizedPair(chosen.prompt_ids, chosen.response_ids, rejected_ids)


@dataclass(frozen=True)
class TokenizedLabelled(TokenizedSFT):
    """A response judged alone (KTO): label True for desirable."""
    label: bool = True


def tokenize_labelled(example: LabelledExample, tokenizer, max_prompt_tokens: int, max_response_tokens: int,
                      end_id: int | None = None) -> TokenizedLabelled:
    item = tokenize_sft(example, tokenizer, max_prompt_tokens, max_response_tokens, end_id)
    return TokenizedLabelled(item.prompt_ids, item.response_ids, example.label)


def collate_pairs(batch: Sequence[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """All chosen rows, then all rejected rows, in one right-padded batch of 2B (one forward pass)."""
    return collate_sft([p.chosen for p in batch] + [p.rejected for p in batch], pad_token_id)


def texts_of(example: SFTExample | PreferenceExample) -> tuple[str, ...]:
    """What tokenizing an example reads: its texts (not its origin or data row)."""
    if isinstance(example, PreferenceExample):
        return example.prompt, example.chosen, example.rejected
    if isinstance(example, LabelledExample):
        return example.prompt, example.completion, "desirable" if example.label else "undesirable"
    return example.prompt, example.completion


def tokenize_examples(examples: Sequence[SFTExample] | Sequence[PreferenceExample], tokenizer, *,
                      max_prompt_tokens: int, max_response_tokens: int, end_id: int | None = None,
                      cache_dir: str | Path | None = None) -> list[TokenizedSFT] | list[TokenizedPair]:
    """`tokenize_sft` / `tokenize_pair` over `examples`, read from `cache_dir` when an earlier process
    tokenized the same texts with the same tokenizer, caps and tokenizing code (the ~2,200 TL;DR
    examples take ~3 s to tokenize, at the start of every run and test process)."""
    first = examples[0] if examples else None
    tokenize, made = ((tokenize_pair, TokenizedPair) if isinstance(first, PreferenceExample)
                      else (tokenize_labelled, TokenizedLabelled) if isinstance(first, LabelledExample)
                      else (tokenize_sft, TokenizedSFT))
    path = None
    fingerprint = tokenizer_hash(tokenizer)
    if cache_dir is not None and fingerprint is not None:
        code = [Path(__file__).read_bytes(), Path(tokens.__file__).read_bytes()]
        texts = ("\0".join(texts_of(ex)) for ex in examples)
        key = digest([fingerprint, *code, f"{max_prompt_tokens},{max_response_tokens},{end_id}", *texts])
        path = Path(cache_dir) / "tokenized" / f"{key[:32]}.json"
        kept = read_json(path)
        if isinstance(kept, list) and len(kept) == len(examples):
            return [made(*row) for row in kept]
    items = [tokenize(ex, tokenizer, max_prompt_tokens, max_response_tokens, end_id)
             for ex in tqdm(examples, desc="tokenize", leave=False, disable=len(examples) < 500)]
    write_json(path, [as_row(item) for item in items])
    return items


def as_row(item: TokenizedSFT | TokenizedPair) -> tuple[list[int], ...]:
    """The item's id lists in field order: `dataclasses.astuple` without its deep copy of every int (seconds
    over a split of a few thousand rows, in every process that loads data)."""
    return tuple(getattr(item, field.name) for field in fields(item))


def split_digest(items: Sequence[TokenizedSFT] | Sequence[TokenizedPair]) -> str:
    """sha256 of a tokenized split, in order: what a resumed run compares to know it trains on the same data."""
    return digest(json.dumps(as_row(item)) for item in items)


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
