"""rlhf_exp: Hydra-configured RLHF experiments (SFT, RM, DPO, GRPO, PPO) on one machine."""

__version__ = "0.1.0"
