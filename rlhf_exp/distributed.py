"""Data parallelism across processes started by `torchrun` (gloo on CPU, NCCL on GPUs).

`torchrun --nproc_per_node N -m rlhf_exp ...`: every rank draws the same global batch from the
same seeded stream, trains on its share (`Trainer.shard`), and gradients are summed across
ranks with one `all_reduce` per parameter before clipping, so every rank takes the identical
optimizer step of the global batch. Each loss is already divided by the global batch's size
(tokens or pairs), which makes the sum exact. Not the `DistributedDataParallel` wrapper: the
stages call the decoder and LM head separately (only scored positions are projected) and
accumulate micro batches, which DDP's forward hooks do not see; bucketed, overlapped
all-reduce is what larger multi-GPU runs would add. Only rank 0 logs to MLflow and writes
checkpoints; the run folder is rank 0's, broadcast to the others.
"""

from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> None:
    if launched() and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_object(value):
    """Rank 0's `value` on every rank."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_gradients(model: torch.nn.Module) -> None:
    """Sum every trainable parameter's gradient over the ranks (missing ones count as zero)."""
    if world_size() == 1:
        return
    for param in model.parameters():
        if param.requires_grad:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)


def sum_values(values: dict[str, float]) -> dict[str, float]:
    """Per-rank partial sums (losses, counts) added over the ranks."""
    if world_size() == 1:
        return values
    keys = sorted(values)
    packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return dict(zip(keys, packed.tolist()))


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 of all parameters' bytes: equal on every rank iff the replicas are identical."""
    digest = hashlib.sha256()
    for param in model.parameters():
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def gather_objects(value) -> list:
    if world_size() == 1:
        return [value]
    out = [None] * world_size()
    dist.all_gather_object(out, value)
    return out
