"""Several responses to one prompt in one row: the prompt's tokens go through the model once.

GRPO scores k samples of each prompt and DPO a chosen and a rejected response; as rows of their own,
each response repeats its prompt, and TL;DR / HH prompts are most of a row's tokens (a 190-token prompt
with four 48-token samples: 944 tokens as rows, 382 packed). Here each distinct prompt becomes one row,
`prompt, response 1, ..., response k`, with

  - a block mask: a response token sees the prompt and the earlier tokens of its own response only;
  - position ids that restart after the prompt for every response;

so each response's log-probs are what a row of its own gives (to rounding; `tests/test_shared_prefix.py`),
and the gradient of the prompt's keys and values is the sum over its responses, as with separate rows.
This is packing with per-document positions (as in Krell et al. 2021) plus a shared prefix, as in
"Prefix Grouper" (Liu et al. 2025) for GRPO.

The mask is a 4D `[P, 1, T, T]` tensor, which transformers passes to the attention as it is: boolean
for SDPA, additive for eager attention. Kernels that take no such mask (flash-attention 2, flex) and
batches where no prompt repeats keep the padded rows of `ops.logprobs.response_logprobs`.

Training steps run under `masked_attention_kernels()`: SDPA without its cuDNN backend, which PyTorch
prefers on Hopper and whose backward returns NaN for inputs with an explicit mask when a row is 64 mod
128 wide and some row's log-sum-exp is very negative, as a Qwen2.5 head's is (pytorch/pytorch#196678,
huggingface/trl#7181: DPO went NaN on Qwen2.5 with the default SDPA backend).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from rlhf_exp.ops.logprobs import decoder, head_logprobs

MASKED_ATTENTION = ("sdpa", "eager")  # attention implementations that take a 4D mask as it is
# SDPA's backends for masked rows: all but cuDNN attention (see above). Flash attention takes no mask, so SDPA
# passes it over for these rows anyway; on a CPU, flash and math are the kernels there are.
MASKED_SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


class PromptAndResponse(Protocol):
    """An item to pack: a tokenized prompt and one response to it (data.collate.TokenizedSFT, a rollout's)."""
    prompt_ids: Sequence[int]
    response_ids: Sequence[int]


def masked_attention_kernels():
    """The SDPA backends a training step (forward, a checkpointed layer's recomputation, backward) may use."""
    return sdpa_kernel(list(MASKED_SDPA_BACKENDS))


@dataclass
class PackedRows:
    """Items packed by prompt. P rows of width T; N scored tokens over B items (R: the longest response)."""
    input_ids: torch.Tensor      # [P, T] prompt, then each response in turn, then pad
    position_ids: torch.Tensor   # [P, T] 0.. over the prompt, then prompt length.. again for each response
    segment: torch.Tensor        # [P, T] 0 prompt, s >= 1 the row's s-th response, -1 pad
    source: torch.Tensor         # [N] flat index (row * T + column) of the hidden state that predicts each token
    target: torch.Tensor         # [N] the token predicted
    item: torch.Tensor           # [N] which item (0..B-1) the token belongs to
    offset: torch.Tensor         # [N] its place in that item's response (0..R-1)
    lengths: torch.Tensor        # [B] response lengths
    ends: torch.Tensor           # [B] flat index of each item's last token (where a reward model reads it); -1: empty


def repeats_a_prompt(items: Sequence[PromptAndResponse]) -> bool:
    """Whether two items with a response share their prompt (packing saves nothing otherwise)."""
    prompts = [tuple(x.prompt_ids) for x in items if x.response_ids]
    return len(set(prompts)) < len(prompts)


def pack_by_prompt(items: Sequence[PromptAndResponse], pad_token_id: int) -> PackedRows:
    """One row per distinct prompt (in order of first appearance) holding every response to it."""
    rows: dict[tuple[int, ...], list[int]] = {}
    for k, item in enumerate(items):
        if item.response_ids:
            rows.setdefault(tuple(item.prompt_ids), []).append(k)
    widths = [len(prompt) + sum(len(items[k].response_ids) for k in members) for prompt, members in rows.items()]
    width = max(widths, default=1)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment = torch.full(shape, -1, dtype=torch.long)
    source, target, owner, offset = [], [], [], []
    ends = [-1] * len(items)
    for row, (prompt, members) in enumerate(rows.items()):
        p = len(prompt)
        if p == 0:  # its first response token would be read off the previous row's last position
            raise ValueError("an empty prompt cannot be packed: data.tokens.encode_prompt gives every prompt a token")
        input_ids[row, :p] = torch.tensor(prompt, dtype=torch.long)
        position_ids[row, :p] = torch.arange(p)
        segment[row, :p] = 0
        start = p
        for s, k in enumerate(members, start=1):
            response = items[k].response_ids
            n = len(response)
            input_ids[row, start:start + n] = torch.tensor(response, dtype=torch.long)
            position_ids[row, start:start + n] = torch.arange(p, p + n)
            segment[row, start:start + n] = s
            # token 0 is predicted from the prompt's last position, token j > 0 from token j - 1
            source += [row * width + p - 1] + [row * width + start + j - 1 for j in range(1, n)]
            target += response
            owner += [k] * n
            offset += range(n)
            start += n
            ends[k] = row * width + start - 1
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return PackedRows(input_ids, position_ids, segment, as_long(source), as_long(target), as_long(owner),
                      as_long(offset), as_long([len(x.response_ids) for x in items]), as_long(ends))


def block_mask(segment: torch.Tensor) -> torch.Tensor:
    """[P, T] segments -> [P, 1, T, T] bool, True where query t may attend to key u: u <= t, and u in the
    prompt or in t's own response. A pad position sees itself only (a row with nothing to attend to
    would give NaN in SDPA)."""
    query, key = segment[:, :, None], segment[:, None, :]
    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment.device).tril()
    allowed = causal & (key == 0) & (query >= 0) | causal & (key == query) & (query > 0)
    allowed |= torch.eye(width, dtype=torch.bool, device=segment.device)
    return allowed[:, None]


def attention_mask_for(model, segment: torch.Tensor) -> torch.Tensor:
    """`block_mask` in the form the model's attention takes: bool (SDPA), or 0 / float32-min added to the
    scores (eager; float32 whatever the weights: a bf16 score plus it promotes, and softmax still gives 0)."""
    allowed = block_mask(segment)
    if attention_implementation(model) == "sdpa":
        return allowed
    blocked = torch.finfo(torch.float32).min
    return torch.zeros(allowed.shape, device=segment.device).masked_fill(~allowed, blocked)


def attention_implementation(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def can_pack(model) -> bool:
    return attention_implementation(model) in MASKED_ATTENTION


def packed_inputs(model, packed: PackedRows, device: torch.device) -> dict[str, torch.Tensor]:
    """The model's keyword arguments for the packed rows: ids, restarting positions and the block mask."""
    return {"input_ids": packed.input_ids.to(device), "position_ids": packed.position_ids.to(device),
            "attention_mask": attention_mask_for(model, packed.segment.to(device))}


def packed_response_logprobs(model, items: Sequence[PromptAndResponse], pad_token_id: int, device: torch.device,
                             temperature: float = 1.0, with_entropy: bool = False):
    """As `ops.logprobs.response_logprobs` for `items`, with each prompt run once:
    (logps [B, R], mask [B, R], entropy [B, R] or None), entries past a response's end 0."""
    packed = pack_by_prompt(items, pad_token_id)
    hidden = decoder(model)(**packed_inputs(model, packed, device), use_cache=False).last_hidden_state  # [P, T, H]
    picked, token_entropy = head_logprobs(model, hidden.flatten(0, 1)[packed.source.to(device)],
                                          packed.target.to(device), temperature, with_entropy)
    longest = int(packed.lengths.max()) if len(items) else 0
    where = (packed.item.to(device), packed.offset.to(device))
    logps = torch.zeros(len(items), longest, device=device)
    logps = logps.index_put(where, picked)
    mask = (torch.arange(longest)[None, :] < packed.lengths[:, None]).float().to(device)
    entropy = None
    if token_entropy is not None:
        entropy = torch.zeros(len(items), longest, device=device).index_put(where, token_entropy)
    return logps, mask, entropy
