"""One file per stage trainer: sft.py (rm, dpo, grpo and ppo join as one file each).
Shared loop, checkpointing and logging: base.py."""
