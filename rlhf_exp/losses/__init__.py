"""Losses as small pure functions of tensors (torch only). One file per family."""

from rlhf_exp.losses.sft import sft_loss

__all__ = ["sft_loss"]
