"""Per-token log-probabilities: the hot path of SFT, DPO, GRPO and PPO.

`masked_next_token_logprobs` projects only the positions a loss needs onto the vocabulary:
for TL;DR SFT ~85% of tokens are prompt, and the vocabulary projection plus log-softmax
over 49k tokens is a fifth of the step's compute and most of its memory. `head_logprobs`
projects at most `LOGITS_CHUNK_BYTES` of fp32 logits at a time, so no [tokens, vocabulary]
float32 tensor is held for a long batch (the Liger / Cut-Cross-Entropy idea, in plain PyTorch).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

# The fp32 logits of one chunk of positions: 256 MiB is 1365 tokens of SmolLM2's 49k vocabulary and
# 440 of Qwen2.5's 152k. A batch that fits in one chunk runs as one projection; a longer one is split,
# and each chunk's logits are recomputed in backward instead of kept (one more head matmul per chunk).
LOGITS_CHUNK_BYTES = 256 * 2**20


def decoder(model):
    """The transformer body (no LM head) of a causal LM, a PeftModel around one, or a reference
    with adapters disabled: what returns `last_hidden_state`."""
    get_base = getattr(model, "get_base_model", None)
    return (get_base() if get_base is not None else model).base_model


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(labels) under softmax(logits / temperature).

    logits [..., V] (any float dtype; computed in fp32), labels [...] -> [...].
    `temperature` must be the sampling temperature when scoring sampled tokens.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def next_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        position_ids: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for every t < T-1: [B, T] ids -> [B, T-1]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits
    return token_logprobs(logits[:, :-1], input_ids[:, 1:], temperature)


def masked_next_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                               target_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                               temperature: float = 1.0) -> torch.Tensor:
    """Like `next_token_logprobs`, but only targets where `target_mask` [B, T] is 1 are scored.

    Returns [B, T-1]: log p of input_ids[:, t+1] where target_mask[:, t+1] == 1, else 0.
    The backbone runs once; the LM head runs on the selected positions only. Models whose
    head does more than a linear projection (logit soft-capping) need `next_token_logprobs`.
    """
    hidden, targets, select = scored_hidden(model, input_ids, target_mask, attention_mask, position_ids)
    picked, _ = head_logprobs(model, hidden, targets, temperature)  # [N]
    out = torch.zeros(select.shape, dtype=torch.float32, device=hidden.device)
    out[select] = picked
    return out


def scored_hidden(model, input_ids: torch.Tensor, target_mask: torch.Tensor, attention_mask=None, position_ids=None):
    """The backbone once, then the hidden states that predict the targets where target_mask [B, T] is 1:
    (hidden [N, H], targets [N], select [B, T-1]: which next tokens are scored)."""
    hidden = decoder(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state  # [B, T, H]
    select = target_mask[:, 1:].bool()
    return hidden[:, :-1][select], input_ids[:, 1:][select], select


def response_logprobs(model, input_ids: torch.Tensor, prompt_lengths: torch.Tensor, response_lengths: torch.Tensor,
                      temperature: float = 1.0, with_entropy: bool = False):
    """Log-probs of each response token, aligned to the response: [B, R], R = longest response.

    Rows are right-padded prompt + response (as `collate_sft` builds them). Returns
    (logps [B, R], mask [B, R], entropy [B, R] or None); entries past a response's end are 0.
    Only response positions go through the LM head.
    """
    batch, width = input_ids.shape
    columns = torch.arange(width, device=input_ids.device)
    prompt_lengths, response_lengths = prompt_lengths.to(input_ids.device), response_lengths.to(input_ids.device)
    target_mask = ((columns >= prompt_lengths[:, None]) &
                   (columns < (prompt_lengths + response_lengths)[:, None])).long()
    hidden = decoder(model)(input_ids=input_ids, use_cache=False).last_hidden_state  # right padding: no mask
    select = target_mask[:, 1:].bool()
    picked, token_entropy = head_logprobs(model, hidden[:, :-1][select], input_ids[:, 1:][select], temperature,
                                          with_entropy)
    longest = int(response_lengths.max())
    mask = (torch.arange(longest, device=input_ids.device)[None, :] < response_lengths[:, None])
    logps = torch.zeros(batch, longest, device=input_ids.device)
    logps[mask] = picked  # row-major order matches `select`
    entropy = None
    if token_entropy is not None:
        entropy = torch.zeros(batch, longest, device=input_ids.device)
        entropy[mask] = token_entropy
    return logps, mask.float(), entropy


def head_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                  with_entropy: bool = False, chunk_bytes: int = LOGITS_CHUNK_BYTES
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head on the N hidden states that predict `targets`: hidden [N, H], targets [N] ->
    (log p(target) at `temperature` [N] in fp32, the distribution's entropy [N] without gradient, or None).

    At most `chunk_bytes` of fp32 logits exist at once (see LOGITS_CHUNK_BYTES)."""
    head = model.get_output_embeddings()
    # out_features, not weight.shape: a DeepSpeed ZeRO-3 rank holds an empty placeholder for the weight
    rows = chunk_rows(vocabulary_size(head), chunk_bytes)
    if hidden.shape[0] <= rows:
        return _head_chunk(head, hidden, targets, temperature, with_entropy)
    keep_graph = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
    parts = [checkpoint(_head_chunk, head, h, t, temperature, with_entropy, use_reentrant=False) if keep_graph
             else _head_chunk(head, h, t, temperature, with_entropy)
             for h, t in zip(hidden.split(rows), targets.split(rows))]
    picked = torch.cat([p for p, _ in parts])
    return picked, torch.cat([e for _, e in parts]) if with_entropy else None


def chunk_rows(vocabulary: int, chunk_bytes: int = LOGITS_CHUNK_BYTES) -> int:
    """How many positions' fp32 logits fit in `chunk_bytes` (at least one)."""
    return max(1, chunk_bytes // (4 * vocabulary))


def vocabulary_size(head: torch.nn.Module) -> int:
    out_features = getattr(head, "out_features", None)
    return int(out_features) if out_features else max(int(head.weight.shape[0]), 1)


def _head_chunk(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    # outside autocast, in the head's dtype (fp32: Trainer.trainable, frozen_copy): fp32 logits for the log-softmax
    with torch.autocast(hidden.device.type, enabled=False):
        logits = head(hidden.to(head.weight.dtype)).float() / temperature  # [n, V]
    log_norm = torch.logsumexp(logits, dim=-1)
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = log_norm - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return picked, entropy
