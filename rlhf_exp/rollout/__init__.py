"""Generation (and, with the RL stages, scoring)."""

from rlhf_exp.rollout.generation import generate

__all__ = ["generate"]
