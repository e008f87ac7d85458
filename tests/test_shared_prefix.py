"""ops/shared_prefix.py: responses packed behind one copy of their prompt score as rows of their own, and
the sampler's shared prefill and dropped finished rows change nothing but the work."""

from __future__ import annotations

import pytest
import torch

from rlhf_exp.data.collate import TokenizedSFT, collate_sft
from rlhf_exp.ops.logprobs import response_logprobs
from rlhf_exp.ops.shared_prefix import block_mask, pack_by_prompt, packed_response_logprobs, repeats_a_prompt
from rlhf_exp.rollout.generation import generate
from test_generation import tiny_model

PAD = 0


def test_the_block_mask_lets_a_response_see_the_prompt_and_its_own_earlier_tokens_only():
    # prompt [5, 6], responses [7, 8] and [9], then one pad
    packed = pack_by_prompt([TokenizedSFT([5, 6], [7, 8]), TokenizedSFT([5, 6], [9])], PAD)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2]]  # the second response starts after the prompt again
    assert packed.segment.tolist() == [[0, 0, 1, 1, 2]]
    # token 7 from the prompt's last position (1), 8 from 7's (2), 9 from the prompt's last position again
    assert packed.source.tolist() == [1, 2, 1] and packed.target.tolist() == [7, 8, 9]
    assert packed.item.tolist() == [0, 0, 1] and packed.offset.tolist() == [0, 1, 0]
    assert block_mask(packed.segment)[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # response 2 does not see response 1
    ]
    padded = pack_by_prompt([TokenizedSFT([5], [7]), TokenizedSFT([4, 4, 4], [8])], PAD)
    assert padded.segment.tolist() == [[0, 1, -1, -1], [0, 0, 0, 1]]
    assert block_mask(padded.segment)[0, 0, 3].int().tolist() == [0, 0, 0, 1]  # a pad sees itself: no NaN


def test_packing_is_only_chosen_when_a_prompt_repeats():
    assert repeats_a_prompt([TokenizedSFT([1, 2], [3]), TokenizedSFT([1, 2], [4])])
    assert not repeats_a_prompt([TokenizedSFT([1, 2], [3]), TokenizedSFT([1, 3], [4])])
    assert not repeats_a_prompt([TokenizedSFT([1, 2], [3]), TokenizedSFT([1, 2], [])])  # an empty one adds nothing


def rollout_items():
    """Two prompts of different lengths with three and two samples, interleaved, one of them empty."""
    a, b = list(range(300, 317)), list(range(400, 405))
    return [TokenizedSFT(a, [11, 12, 13, 2]), TokenizedSFT(b, [21, 22]), TokenizedSFT(a, [14, 15]),
            TokenizedSFT(b, []), TokenizedSFT(a, [16, 17, 18, 19, 20, 2]), TokenizedSFT(b, [23, 24, 25])]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_log_probs_entropy_and_gradients_equal_separate_rows(tokenizer, attention):
    """The bugs this catches: a response that attends to another response of its prompt, positions that
    run on through the packed row instead of restarting (RoPE), a token scored from the wrong position,
    a mask of the wrong kind for the attention (bool added to the scores by eager attention)."""
    model = tiny_model(tokenizer)
    model.config._attn_implementation = attention
    items = rollout_items()
    batch = collate_sft(items, PAD)
    lengths = torch.tensor([len(x.response_ids) for x in items])
    separate = response_logprobs(model, batch["input_ids"], torch.tensor([len(x.prompt_ids) for x in items]),
                                 lengths, temperature=0.7, with_entropy=True)
    loss = (separate[0] * torch.arange(1.0, 7.0)[:, None]).sum()  # a different weight per response
    separate_grads = torch.autograd.grad(loss, list(model.parameters()))

    packed = packed_response_logprobs(model, items, PAD, torch.device("cpu"), temperature=0.7, with_entropy=True)
    for got, want in zip(packed, separate):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert packed[1].sum(-1).tolist() == [4, 2, 2, 0, 6, 3]
    loss = (packed[0] * torch.arange(1.0, 7.0)[:, None]).sum()
    for got, want in zip(torch.autograd.grad(loss, list(model.parameters())), separate_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_packed_log_probs_under_bf16_autocast_agree_with_fp32_rows(tokenizer):
    """The mask in the form SDPA takes under autocast (bool, whatever the query's dtype); bf16 keeps ~3
    significant digits, so the tolerance is bf16's: 0.05 on log-probs of a 49k vocabulary."""
    model = tiny_model(tokenizer)
    items = rollout_items()
    want, _, _ = packed_response_logprobs(model, items, PAD, torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _, _ = packed_response_logprobs(model, items, PAD, torch.device("cpu"))
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.01)


def test_several_samples_per_prompt_from_one_prefill_equal_each_prompt_sampled_alone(tokenizer):
    """The prompt read once and its cache copied per sample, and rows that stop leaving the batch (their
    cache rows dropped), give greedy rows equal to each prompt sampled alone: catches a copied cache in
    the wrong row order and a cache, mask or position kept for the wrong rows after one stops."""
    model = tiny_model(tokenizer)
    prompts = [list(range(100, 130)), list(range(200, 206)), list(range(300, 312))]
    greedy = dict(pad_token_id=tokenizer.pad_token_id, max_new_tokens=10, top_k=1)
    free = [generate(model, [p], stop_token_ids=[], **greedy)[0] for p in prompts]
    # a token of the middle row's that the others never produce: that row stops early, the others run on
    stop = next(t for t in free[1] if t not in free[0] + free[2])
    alone = [generate(model, [p], stop_token_ids=[stop], **greedy)[0] for p in prompts]
    shared = generate(model, prompts, repeats=2, stop_token_ids=[stop], **greedy)
    assert shared == [row for row in alone for _ in range(2)]
    assert len(alone[1]) < 10 and len(alone[0]) == len(alone[2]) == 10

    sampled = generate(model, prompts, repeats=4, stop_token_ids=list(range(0, 49152, 50)), temperature=1.0,
                       generator=torch.Generator().manual_seed(4), pad_token_id=tokenizer.pad_token_id,
                       max_new_tokens=12)
    assert len(sampled) == 12 and all(len(r) == 12 or r[-1] % 50 == 0 for r in sampled)
    assert tokenizer.pad_token_id not in [t for r in sampled for t in r[:-1]]  # no pad inside a response


def test_a_reward_model_reads_the_same_scores_from_packed_pairs_as_from_rows(tokenizer):
    """The RM's chosen and rejected behind one copy of the prompt: each score read at its own response's
    last token (`PackedRows.ends`), as a row of its own reads it at its EOS."""
    from rlhf_exp.models.reward import reward_model_from_causal_lm
    from rlhf_exp.ops.shared_prefix import packed_inputs

    model = reward_model_from_causal_lm(tiny_model(tokenizer))
    items = [x for x in rollout_items() if x.response_ids]
    batch = collate_sft(items, PAD)
    rows = model(batch["input_ids"], batch["lengths"])
    packed = pack_by_prompt(items, PAD)
    scores = model.scores_at(packed.ends, **packed_inputs(model, packed, torch.device("cpu")))
    torch.testing.assert_close(scores, rows, atol=1e-5, rtol=1e-5)
    assert rows.std() > 1e-3  # the responses score differently: the comparison means something


def test_an_empty_prompt_is_a_sequence_start_and_never_reads_another_row(tokenizer):
    """With a tokenizer that adds no BOS an empty prompt was no token at all: packed, its responses' first token
    was read off the previous row's last hidden state (row * T - 1); in a padded row the log-probs did not line
    up. Its prompt is now the EOS alone, and packing an empty prompt is refused rather than read wrongly."""
    from rlhf_exp.data.collate import tokenize_sft
    from rlhf_exp.data.formats import SFTExample
    from rlhf_exp.data.tokens import bos_prefix

    assert not bos_prefix(tokenizer)  # SmolLM2's tokenizer adds none, as Qwen's does not
    empty = tokenize_sft(SFTExample("", " a short answer"), tokenizer, 48, 16)
    assert empty.prompt_ids == [tokenizer.eos_token_id]
    model = tiny_model(tokenizer)
    items = [TokenizedSFT(list(range(300, 310)), [11, 12]), TokenizedSFT(list(range(300, 310)), [13]),
             TokenizedSFT(empty.prompt_ids, empty.response_ids), TokenizedSFT(empty.prompt_ids, [14, 15, 2])]
    batch = collate_sft(items, PAD)
    separate = response_logprobs(model, batch["input_ids"], torch.tensor([len(x.prompt_ids) for x in items]),
                                 torch.tensor([len(x.response_ids) for x in items]))
    packed = packed_response_logprobs(model, items, PAD, torch.device("cpu"))
    torch.testing.assert_close(packed[0], separate[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="empty prompt"):
        pack_by_prompt([TokenizedSFT([5, 6], [7]), TokenizedSFT([], [8]), TokenizedSFT([], [9])], PAD)
