"""Supervised fine-tuning loss (InstructGPT, Ouyang et al. 2022, sec. 3.5; Stiennon et al. 2020)."""

from __future__ import annotations

import torch


def sft_loss(token_logps: torch.Tensor, loss_mask: torch.Tensor, num_tokens: int | torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the response tokens.

    token_logps [B, T]: log p of each target token; loss_mask [B, T]: 1 on response tokens.
    `num_tokens` is the count of response tokens in the whole global batch (all micro batches
    of one optimizer step), so gradient accumulation gives the same gradient as one big batch.
    Returns a scalar: sum(-logp * mask) / num_tokens.
    """
    return -(token_logps * loss_mask).sum() / num_tokens
