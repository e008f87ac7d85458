"""The built-in sampler: what it computes and that left padding does not change what it samples."""

from __future__ import annotations

import torch

from rlhf_exp.config import compose_config
from rlhf_exp.models import load_causal_lm
from rlhf_exp.rollout.generation import generate


def tiny_model(tokenizer):
    cfg = compose_config(["model=tiny"])
    torch.manual_seed(0)
    return load_causal_lm(cfg.model, cfg.paths.cache_dir, tokenizer).eval()


def test_the_prefill_projects_only_the_last_position_onto_the_vocabulary(tokenizer):
    """Every prompt position through the LM head held [B, prompt, V] logits that nothing reads."""
    model = tiny_model(tokenizer)
    positions = []
    model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: positions.append(args[0].shape[1]))
    generate(model, [list(range(10, 40)), list(range(50, 60))], pad_token_id=tokenizer.pad_token_id,
             stop_token_ids=[], max_new_tokens=3, generator=torch.Generator().manual_seed(0))
    assert positions == [1, 1, 1]


def test_a_row_computes_the_same_beside_a_longer_prompt_as_alone(tokenizer):
    """A short prompt left-padded beside a long one sees the same hidden states at every step as alone:
    catches an attention mask that lets the row attend to its padding."""
    model = tiny_model(tokenizer)
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0][:, -1]))
    short, long = list(range(100, 106)), list(range(200, 230))
    kwargs = dict(pad_token_id=tokenizer.pad_token_id, stop_token_ids=[], max_new_tokens=4, top_k=1)
    alone = generate(model, [short], **kwargs)
    hidden_alone = torch.cat(seen)
    seen.clear()
    together = generate(model, [long, short], **kwargs)
    hidden_together = torch.stack([h[1] for h in seen])
    assert together[1] == alone[0]
    torch.testing.assert_close(hidden_together, hidden_alone, atol=1e-5, rtol=1e-4)


def test_the_sampler_passes_its_cache_by_a_name_the_installed_forward_declares(tokenizer):
    """transformers renamed forward's `past_key_values` to `cache` and drops the old name in 5.40, inside
    the allowed range: catches a sampler that passes a name the forward no longer declares (kept only
    by a deprecation shim), or that starts a new cache part-way instead of filling one in place."""
    import inspect

    model = tiny_model(tokenizer)
    declared = inspect.signature(model.forward).parameters
    caches = []

    def record(_module, _args, kwargs):
        names = [name for name in ("cache", "past_key_values") if kwargs.get(name) is not None]
        assert len(names) == 1 and names[0] in declared, (names, list(declared))
        caches.append(kwargs[names[0]])

    model.register_forward_pre_hook(record, with_kwargs=True)
    generate(model, [list(range(10, 20))], pad_token_id=tokenizer.pad_token_id, stop_token_ids=[],
             max_new_tokens=3, generator=torch.Generator().manual_seed(0))
    assert len(caches) == 3 and all(cache is caches[0] for cache in caches)
    assert caches[0].get_seq_length() == 10 + 2  # the prompt and the two tokens fed back
