"""Loading causal LMs and tokenizers: hub, local folders, the embedded GGUF, random init."""

from rlhf_exp.models.loading import load_causal_lm, load_tokenizer

__all__ = ["load_causal_lm", "load_tokenizer"]
