"""Losses as small pure functions of tensors (torch only). One file per family:
sft.py (SFT), preference.py (reward model, DPO)."""

from rlhf_exp.losses.preference import bradley_terry_loss, dpo_loss
from rlhf_exp.losses.sft import sft_loss

__all__ = ["bradley_terry_loss", "dpo_loss", "sft_loss"]
