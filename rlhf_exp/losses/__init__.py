"""Losses as small pure functions of tensors (torch only). One file per family:
sft.py (SFT), preference.py (reward model, DPO, SimPO, ORPO, KTO), policy.py (GRPO and its kin, PPO)."""

from rlhf_exp.losses.preference import bradley_terry_loss, dpo_loss, kto_loss
from rlhf_exp.losses.sft import sft_loss

__all__ = ["bradley_terry_loss", "dpo_loss", "kto_loss", "sft_loss"]
