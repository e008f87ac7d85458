"""Masks derived by hand: right padding for training, left padding for generation."""

from __future__ import annotations

import torch

from rlhf_exp.data.collate import TokenizedSFT, collate_sft, left_pad, tokenize_sft
from rlhf_exp.data.formats import SFTExample

PAD = EOS = 2  # as in SmolLM2: pad and EOS are the same token


def test_response_only_mask_by_hand_keeps_eos_that_equals_pad():
    batch = [TokenizedSFT([5, 6, 7], [8, 9, EOS]), TokenizedSFT([5], [8, EOS])]
    out = collate_sft(batch, pad_token_id=PAD)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9, 2],
                                         [5, 8, 2, 2, 2, 2]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1],
                                              [1, 1, 1, 0, 0, 0]]
    assert out["response_mask"].tolist() == [[0, 0, 0, 1, 1, 1],
                                             [0, 1, 1, 0, 0, 0]]
    # a mask built from `!= pad` would have lost the EOS of both rows
    assert (out["input_ids"] != PAD).long().tolist() != out["attention_mask"].tolist()
    # next-token targets: position t predicts t+1, so the loss mask is response_mask[:, 1:]
    assert out["response_mask"][:, 1:].sum().item() == 5


def test_left_pad_for_generation_by_hand():
    out = left_pad([[5, 6, 7], [8]], pad_token_id=PAD)
    assert out["input_ids"].tolist() == [[5, 6, 7], [2, 2, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert out["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_tokenize_sft_appends_eos_caps_the_response_and_keeps_the_prompt_end(tokenizer):
    ex = SFTExample("one two three four five six seven eight", " a summary that is rather long indeed")
    full = tokenize_sft(ex, tokenizer, max_prompt_tokens=100, max_response_tokens=100)
    assert full.response_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(full.response_ids[:-1]) == ex.completion
    cut = tokenize_sft(ex, tokenizer, max_prompt_tokens=3, max_response_tokens=4)
    assert cut.prompt_ids == full.prompt_ids[-3:]
    assert cut.response_ids == full.response_ids[:4]
    assert torch.tensor(cut.prompt_ids).numel() == 3
