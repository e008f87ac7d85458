"""The hot path against a plain forward: response log-probs, entropies and critic values of right-padded
batches equal those of each sequence run alone (an off-by-one here would shift every RL signal)."""

from __future__ import annotations

import copy

import torch

from helpers import tiny_config
from rlhf_exp.launch.run import resolved
from rlhf_exp.data.collate import TokenizedSFT, collate_sft
from rlhf_exp.models import load_causal_lm
from rlhf_exp.models.reward import reward_model_from_causal_lm
from rlhf_exp.ops.logprobs import response_logprobs

ITEMS = [TokenizedSFT([5, 6, 7, 8], [9, 10, 2]), TokenizedSFT([11], [12, 2]), TokenizedSFT([13, 14], [15, 16, 17, 2])]
TEMPERATURE = 0.7


def test_response_logprobs_entropy_and_values_match_a_forward_of_each_sequence(tmp_path, tokenizer):
    cfg = resolved(tiny_config(tmp_path))
    torch.manual_seed(0)
    model = load_causal_lm(cfg.model, cfg.paths.cache_dir, tokenizer).eval()
    critic = reward_model_from_causal_lm(copy.deepcopy(model)).eval()
    batch = collate_sft(ITEMS, tokenizer.pad_token_id)
    prompts = torch.tensor([len(x.prompt_ids) for x in ITEMS])
    responses = torch.tensor([len(x.response_ids) for x in ITEMS])
    with torch.no_grad():
        logps, mask, entropy = response_logprobs(model, batch["input_ids"], prompts, responses, TEMPERATURE, True)
        values = critic.response_values(batch["input_ids"], prompts, responses)
        for row, item in enumerate(ITEMS):
            ids = torch.tensor([item.prompt_ids + item.response_ids])
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float() / TEMPERATURE, dim=-1)
            hidden = critic.backbone(input_ids=ids).last_hidden_state[0]
            p = len(item.prompt_ids)
            for j, token in enumerate(item.response_ids):  # token j is predicted at position p - 1 + j
                assert torch.allclose(logps[row, j], log_probs[p - 1 + j, token], atol=1e-5), (row, j)
                expected_entropy = -(log_probs[p - 1 + j].exp() * log_probs[p - 1 + j]).sum()
                assert torch.allclose(entropy[row, j], expected_entropy, atol=1e-4), (row, j)
                expected_value = critic.head(hidden[p - 1 + j]).squeeze(-1)
                assert torch.allclose(values[row, j], expected_value, atol=1e-5), (row, j)
            assert mask[row].sum() == len(item.response_ids) and logps[row, len(item.response_ids):].eq(0).all()


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the most elements any op produced, forward and backward."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(value, torch.Tensor):
                self.numel = max(self.numel, value.numel())
        return out


def test_the_chunked_lm_head_gives_the_same_logprobs_entropy_and_gradients_and_never_holds_all_logits(tokenizer):
    """A chunk stitched back in the wrong order, a chunk's target paired with another's hidden state, or a
    recompute that dropped the temperature would change the values or the gradients; a head that ignored the
    chunk size would produce the whole [N, V] logits."""
    from rlhf_exp.ops.logprobs import head_logprobs
    from test_generation import tiny_model

    model = tiny_model(tokenizer).train()
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0]
    torch.manual_seed(1)
    hidden = torch.randn(83, head.weight.shape[1], requires_grad=True)
    targets = torch.randint(0, vocab, (83,))
    weights = torch.randn(83)  # an arbitrary downstream loss, as DPO's sums and GRPO's ratios are

    def run(chunk_bytes):
        hidden.grad, head.weight.grad = None, None
        with LargestTensor() as largest:
            picked, entropy = head_logprobs(model, hidden, targets, TEMPERATURE, True, chunk_bytes=chunk_bytes)
            (picked * weights).sum().backward()
        return picked.detach(), entropy, hidden.grad.clone(), head.weight.grad.clone(), largest.numel

    whole = run(chunk_bytes=10**12)
    chunked = run(chunk_bytes=10 * 4 * vocab)  # 10 positions a chunk: 8 full chunks and a short one
    for name, a, b in zip(("logprobs", "entropy", "hidden grad", "head grad"), whole, chunked):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name
    # (83 positions' logits outnumber the head's own weight, the largest tensor the chunked head makes)
    assert whole[4] >= 83 * vocab
    assert chunked[4] < 83 * vocab and chunked[4] <= max(10 * vocab, head.weight.numel())
