"""Rollouts: sampling (the project's own loop, with the run's generator) and the typed rollout batch."""

from rlhf_exp.rollout.batch import Rollout
from rlhf_exp.rollout.generation import generate, sample, truncate_after_stop

__all__ = ["Rollout", "generate", "sample", "truncate_after_stop"]
