"""hardware.liger_kernel: Liger-kernel's fused linear cross-entropy for SFT's loss on CUDA GPUs.

Liger's kernel (Triton) runs the LM head and the cross-entropy in chunks and computes the input and weight
gradients in its forward pass, so no logits survive to backward at all. It gives a reduced loss, not per-token
log-probs, so it serves SFT; DPO, GRPO and PPO need the log-probs themselves (ratios, packed responses) and use
the chunked head of `ops.logprobs` everywhere. On a CPU the key falls back to that chunked path, saying so.
Liger is optional: `pip install liger-kernel` (or the `liger` extra) on a CUDA machine.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from omegaconf import DictConfig

from rlhf_exp.errors import ConfigError
from rlhf_exp.ops.logprobs import scored_hidden

log = logging.getLogger(__name__)


def liger_enabled(hardware: DictConfig) -> bool:
    """Whether SFT's loss runs through Liger: hardware.liger_kernel on a CUDA device with liger-kernel installed."""
    if not hardware.get("liger_kernel"):
        return False
    if not str(hardware.device).startswith("cuda"):
        log.info("hardware.liger_kernel: Liger's kernels need CUDA; on %s the chunked LM head runs instead",
                 hardware.device)
        return False
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("hardware.liger_kernel", "the liger-kernel package is not installed "
                          "(pip install liger-kernel, or set hardware.liger_kernel=false)")
    return True


def fused_response_nll(model, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Sum of -log p(input_ids[:, t+1]) over the targets where target_mask [B, T] is 1: the numerator of
    `losses.sft_loss`, from Liger's fused linear cross-entropy. input_ids [B, T] right-padded -> scalar."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    hidden, targets, _ = scored_hidden(model, input_ids, target_mask)  # [N, H], [N]
    head = model.get_output_embeddings()
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, hidden, targets, head.bias)
