"""Loading causal LMs and tokenizers: hub, local folders, the embedded GGUF, random init."""

from rlhf_exp.models.loading import load_causal_lm, load_tokenizer

__all__ = ["load_causal_lm", "load_tokenizer"]


def enable_activation_checkpointing(model) -> None:
    """Recompute activations in backward: transformers' activation_checkpointing_enable where the installed
    release has it (it deprecates gradient_checkpointing_enable, to go in v6), else the older name. This
    project's wrappers (the reward model, PPO's policy + critic) define the new name."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()
