"""Optimizers and schedules from the stage config (library implementations, not home-made)."""

from __future__ import annotations

import logging
import math

import torch
from omegaconf import DictConfig

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")


def build_optimizer(model: torch.nn.Module, stage: DictConfig, name: str = "adamw",
                    shard_states: bool = False) -> torch.optim.Optimizer:
    """`name` (hardware.optimizer): AdamW, or bitsandbytes' 8-bit / paged 8-bit AdamW. Only trainable
    parameters (LoRA: the adapters); no weight decay on biases and norms. `shard_states` (parallel=zero1,
    under torchrun): AdamW's states partitioned over the ranks by PyTorch's ZeroRedundancyOptimizer."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": stage.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    kwargs = dict(lr=stage.lr, betas=tuple(stage.adam_betas))
    if name == "adamw":
        if shard_states and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **kwargs)
        return torch.optim.AdamW(groups, **kwargs, fused=can_fuse(params))
    import bitsandbytes as bnb

    if name not in ("adamw_8bit", "paged_adamw_8bit"):
        raise ValueError(f"unknown optimizer {name!r}")  # validate() catches this first
    keep_embeddings_32bit(model)
    optimizer = bnb.optim.AdamW8bit if name == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return optimizer(groups, **kwargs)


def keep_embeddings_32bit(model: torch.nn.Module) -> None:
    """8-bit Adam keeps 32-bit states for embedding weights (and so a tied LM head), as the HF Trainer does and
    the 8-bit optimizers paper advises: their rows' updates are sparse and uneven, and blockwise 8-bit
    quantization of their moments destabilizes training. bitsandbytes reads these overrides at its first step."""
    import bitsandbytes as bnb

    manager = bnb.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and module.weight.requires_grad:
            manager.register_module_override(module, "weight", {"optim_bits": 32})


def can_fuse(params: list[torch.Tensor]) -> bool:
    """AdamW's fused kernel (one pass over every tensor, CPU and CUDA): torch's CPU default is a Python loop
    over the tensors, ~0.5 s a step for SmolLM2-135M on 2 cores. Plain floating tensors on one device
    type only: FSDP's DTensors keep the default."""
    from torch.distributed.tensor import DTensor

    return bool(params) and len({p.device.type for p in params}) == 1 and params[0].device.type in ("cpu", "cuda") \
        and all(p.is_floating_point() and not isinstance(p, DTensor) for p in params)


def cosine_with_warmup(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """lr multiplier for optimizer step `step` (0-based).

    Linear warmup that starts above zero ((step + 1) / warmup: transformers' version spends the
    first step at lr 0), then cosine from 1 to `min_lr_ratio` at the last step.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(max_steps - 1 - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, stage: DictConfig,
                    total_steps: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup then cosine decay to lr * min_lr_ratio at the last optimizer step (stage.max_steps by default)."""
    total = stage.max_steps if total_steps is None else total_steps
    if total and stage.warmup_steps >= total:
        log.warning("stage.warmup_steps=%d covers the whole run (%d optimizer steps): the learning rate never reaches "
                    "stage.lr=%g; lower stage.warmup_steps", stage.warmup_steps, total, stage.lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_with_warmup(
        step, stage.warmup_steps, total, stage.min_lr_ratio))
