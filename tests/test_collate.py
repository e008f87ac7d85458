"""Masks derived by hand: right padding for training, left padding for generation."""

from __future__ import annotations

import copy

import pytest

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


@pytest.mark.parametrize("spare", [1, 5, 9])  # budgets between the prompt's length and twice it, and beyond
def test_a_prompt_within_its_budget_is_kept_whole(tokenizer, spare):
    """A cut taken as ids[len - budget:] goes negative for such budgets and keeps the prompt's tail only."""
    prompt = "one two three four five six seven eight"
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    item = tokenize_sft(SFTExample(prompt, " a"), tokenizer, max_prompt_tokens=len(ids) + spare, max_response_tokens=8)
    assert item.prompt_ids == ids


def test_tokenize_sft_appends_eos_caps_the_response_and_keeps_the_prompt_end(tokenizer):
    ex = SFTExample("one two three four five six seven eight", " a summary that is rather long indeed")
    full = tokenize_sft(ex, tokenizer, max_prompt_tokens=100, max_response_tokens=100)
    assert full.response_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(full.response_ids[:-1]) == ex.completion
    cut = tokenize_sft(ex, tokenizer, max_prompt_tokens=3, max_response_tokens=4)
    assert cut.prompt_ids == full.prompt_ids[-3:]
    assert cut.response_ids == full.response_ids[:4]


@pytest.fixture
def bos_tokenizer(tokenizer):
    """SmolLM2's tokenizer made to add a BOS as Llama-2's and Mistral's encodings do."""
    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", tok.convert_tokens_to_ids("<|im_start|>"))])
    assert tok("hello").input_ids[0] == tok.bos_token_id  # the fixture really adds one
    return tok


def test_prompts_start_with_bos_where_the_tokenizer_adds_one_and_keep_it_when_cut(bos_tokenizer, tokenizer):
    ex = SFTExample("one two three four five six seven eight", " a summary")
    bos = bos_tokenizer.bos_token_id
    full = tokenize_sft(ex, bos_tokenizer, max_prompt_tokens=100, max_response_tokens=100)
    assert full.prompt_ids[0] == bos and full.prompt_ids.count(bos) == 1
    assert bos not in full.response_ids
    cut = tokenize_sft(ex, bos_tokenizer, max_prompt_tokens=4, max_response_tokens=100)
    assert len(cut.prompt_ids) == 4 and cut.prompt_ids[0] == bos and cut.prompt_ids[1:] == full.prompt_ids[-3:]
    plain = tokenize_sft(ex, tokenizer, max_prompt_tokens=100, max_response_tokens=100)  # SmolLM2 adds none
    assert plain.prompt_ids == full.prompt_ids[1:]


def test_chat_responses_end_with_the_templates_end_of_turn_token(tokenizer):
    """Qwen2.5 base: EOS <|endoftext|>, but a chat turn ends with <|im_end|>; so do Llama-3's <|eot_id|>."""
    from rlhf_exp.data.tokens import end_of_turn_id, stop_token_ids

    tok = copy.deepcopy(tokenizer)
    tok.eos_token = "<|endoftext|>"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id != im_end
    assert end_of_turn_id(tok) == im_end
    item = tokenize_sft(SFTExample("prompt", "reply"), tok, 32, 32, end_id=end_of_turn_id(tok))
    assert item.response_ids[-1] == im_end and tok.eos_token_id not in item.response_ids
    assert set(stop_token_ids(tok, chat=True)) == {tok.eos_token_id, im_end}
    assert stop_token_ids(tok, chat=False) == [tok.eos_token_id]
    assert end_of_turn_id(tokenizer) == tokenizer.eos_token_id  # SmolLM2-Instruct: the two are one token


def test_a_splits_digest_is_unchanged_by_how_its_rows_are_read():
    """Checkpoints record each split's digest and a resume compares it: reading the rows faster must not change
    it, or every earlier checkpoint would be refused as trained on other data."""
    import json
    from dataclasses import astuple

    from rlhf_exp.data.collate import TokenizedPair, TokenizedSFT, split_digest
    from rlhf_exp.data.disk_cache import digest

    for split in ([TokenizedSFT([1, 2, 3], [4, 5]), TokenizedSFT([6], [])],
                  [TokenizedPair([1], [2, 3], [4]), TokenizedPair([5, 6], [], [7, 8, 9])]):
        assert split_digest(split) == digest(json.dumps(astuple(item)) for item in split)
    assert split_digest([TokenizedSFT([1, 2], [3])]) != split_digest([TokenizedSFT([1], [2, 3])])
