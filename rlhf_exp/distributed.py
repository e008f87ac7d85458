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

Sharding (`parallel=` group) goes through PyTorch's own engines: `zero1` partitions optimizer
states with `ZeroRedundancyOptimizer`; `fsdp` / `zero2` wrap every transformer block with FSDP2
`fully_shard` (its reduce-scatter sums the blocks' gradients; the replicated rest is summed here).
Checkpoints are always written whole (full state dicts gathered to rank 0): a sharded run's
model folder loads anywhere; its optimizer state resumes under the same `parallel` mode.

`deepspeed_zero2` / `deepspeed_zero3` hand the model and optimizer to DeepSpeed's engine instead
(`deepspeed.initialize`): the stages' backward and optimizer step go through it
(`Trainer.backward`, `Trainer.optimizer_step`); the model folder is still written whole, and the
optimizer state is DeepSpeed's own partitioned checkpoint beside it.
"""

from __future__ import annotations

import contextlib
import importlib
import hashlib
import math
import os

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.tensor import DTensor


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
    """The process group of a torchrun run. On GPUs NCCL carries CUDA tensors and gloo any CPU tensor a
    library hands a collective (NCCL alone has no CPU backend); this project's own collectives go through
    `all_reduce_sum`, on the device the group wants."""
    if launched() and not dist.is_initialized():
        if device.startswith("cuda"):
            local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(local)  # before the group: NCCL binds each rank to its current device
            dist.init_process_group(backend="cpu:gloo,cuda:nccl", device_id=local)
        else:
            dist.init_process_group(backend="gloo")


def collective_device() -> torch.device:
    """Where a tensor handed to `all_reduce` must live: this rank's GPU when the group runs NCCL (a CPU
    tensor there dies with "No backend type associated with device type cpu"), else the CPU (gloo)."""
    if dist.is_available() and dist.is_initialized() and "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the ranks (of a group of one too), moved to the group's device for the collective;
    returned there."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    on_device = tensor.to(collective_device())
    dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
    return on_device


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(value):
    """Rank 0's `value` on every rank."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_gradients(model: torch.nn.Module) -> None:
    """Sum every replicated trainable parameter's gradient over the ranks (missing ones count as
    zero). FSDP-sharded parameters (DTensors) were already reduce-scattered in backward."""
    if world_size() == 1:
        return
    for param in model.parameters():
        if param.requires_grad and not isinstance(param, DTensor):
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model (its `_no_split_modules` classes), the FSDP units."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_model(model: torch.nn.Module, parallel: DictConfig) -> torch.nn.Module:
    """FSDP2 over each transformer block when `parallel.fsdp` and several ranks; else `model` as is."""
    if world_size() == 1 or not parallel.fsdp:
        return model
    from torch.distributed.fsdp import fully_shard

    blocks = transformer_blocks(model)
    if not blocks:
        raise RuntimeError(f"parallel={parallel.name}: found no transformer blocks (_no_split_modules) "
                           f"in {type(model).__name__} to shard")
    for block in blocks:
        fully_shard(block, reshard_after_forward=bool(parallel.reshard_after_forward))
        # losses are already divided by the global batch's size: sum the ranks' gradients, not mean
        block.set_gradient_divide_factor(1.0)
        block.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM; NCCL transfers zero-copy
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """FSDP-wrapped (its parameters are plain tensors while gathered, so look at the modules)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def clip_grad_norm(parameters, max_norm: float) -> float:
    """`torch.nn.utils.clip_grad_norm_` that also takes a mix of FSDP shards and replicated grads:
    the shards' squared norms are summed over the ranks, the replicated ones counted once."""
    params = [p for p in parameters if p.grad is not None]
    if not any(isinstance(p, DTensor) for p in params):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    sharded, replicated = 0.0, 0.0
    for p in params:
        if isinstance(p.grad, DTensor):
            sharded = sharded + p.grad.to_local().detach().double().pow(2).sum().to(collective_device())
        else:
            replicated = replicated + float(p.grad.detach().double().pow(2).sum())
    if isinstance(sharded, torch.Tensor):
        sharded = float(all_reduce_sum(sharded))
    total = math.sqrt(sharded + replicated)
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for p in params:
            p.grad.mul_(coef)
    return total


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole state dict on rank 0 (collective) when the model is FSDP-sharded; None when it is not."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_gathered(model: torch.nn.Module, folder, state: dict[str, torch.Tensor]) -> None:
    """A gathered whole state written as a Hugging Face folder (config + model.safetensors, sharded
    past 5 GB), the way `save_pretrained` writes it, without touching the sharded model's own
    `state_dict` (which `save_pretrained` calls, and which FSDP answers with a collective)."""
    from huggingface_hub import save_torch_state_dict
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):  # this project's models (the RM) take the gathered state
        model.save_pretrained(folder, state_dict=state)
        return
    # one name per tied tensor (the embedding, not the LM head that shares it), as Hugging Face saves
    keep = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    save_torch_state_dict({k: v for k, v in state.items() if k in keep}, folder)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state on rank 0 (collective for sharded optimizers), as one process saves it."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)
        return optimizer.state_dict() if is_main() else {}
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a whole optimizer state (from `full_optimizer_state` or a one-process run) on every rank."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def sum_values(values: dict[str, float]) -> dict[str, float]:
    """Per-rank partial sums (losses, counts) added over the ranks."""
    if world_size() == 1:
        return values
    keys = sorted(values)
    packed = all_reduce_sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    return dict(zip(keys, packed.cpu().tolist()))


def sum_by_key(values: dict[str, float]) -> dict[str, float]:
    """Like `sum_values`, for dicts whose keys may differ between ranks (a rank with nothing to add)."""
    if world_size() == 1:
        return dict(values)
    total: dict[str, float] = {}
    for part in gather_objects(values):
        for key, value in part.items():
            total[key] = total.get(key, 0.0) + value
    return total


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 of all parameters' bytes: equal on every rank iff the replicas are identical."""
    digest = hashlib.sha256()
    for param in model.parameters():
        with _gathered_by_deepspeed(param):
            # FSDP: gathered (collective). A copy either way: a numpy view would pin FSDP's gathered storage
            whole = param.full_tensor() if isinstance(param, DTensor) else param.detach().clone()
        digest.update(whole.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------ DeepSpeed (parallel=deepspeed_*)
def deepspeed_stage(parallel) -> int:
    """The ZeRO stage of a `deepspeed_*` parallel mode; 0 for PyTorch's own modes."""
    config = (parallel or {}).get("deepspeed") or {}
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def shards_weights(parallel) -> bool:
    """Whether the mode partitions the weights over the ranks: fsdp / zero2 (FSDP2), deepspeed_zero3."""
    return bool((parallel or {}).get("fsdp")) or deepspeed_stage(parallel) == 3


def deepspeed_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, parallel: DictConfig,
                     max_grad_norm: float | None):
    """`deepspeed.initialize` over the model and the stage's torch optimizer (ZeRO partitions its states).

    The stages accumulate micro batches themselves and divide every loss by the global batch, so
    DeepSpeed sees one micro batch per step (its accumulation off) and `deepspeed_backward` undoes its
    mean over the ranks. Clipping is DeepSpeed's (`gradient_clipping`), at the stage's max_grad_norm."""
    import deepspeed

    # DeepSpeed's CPU shared-memory all-reduce op serves only `inference_all_reduce` (DeepSpeed-Inference's
    # tensor-parallel layers), which training never calls; building it is a C++ compile of 30-100 s on the
    # first CPU run of each machine and install path. Its communication backend then skips it. (The module
    # by name: `deepspeed.comm.torch` the attribute is the torch library.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

    config = OmegaConf.to_container(parallel.deepspeed, resolve=True)
    config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, managed_gradient_accumulation=False,
                  gradient_clipping=float(max_grad_norm or 0.0), zero_allow_untested_optimizer=True,
                  steps_per_print=2**31 - 1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    return engine


def deepspeed_backward(engine, loss: torch.Tensor) -> None:
    # What `engine.forward` does first (the stages call the module's parts directly): without it ZeRO-3
    # never advances its micro step and each micro batch's gradient overwrites the last one's.
    engine.optimizer.clear_backward_seen_flag()
    engine.backward(loss * world_size())  # DeepSpeed averages gradients over the ranks; the stages sum


def deepspeed_model_state(engine) -> dict[str, torch.Tensor] | None:
    """ZeRO-3: the whole state dict on rank 0, gathered one layer at a time (collective); None below
    stage 3, where every rank holds the whole weights."""
    if engine.zero_optimization_stage() < 3:
        return None
    return engine._zero3_consolidated_16bit_state_dict()  # as accelerate and the HF Trainer gather it


def _gathered_by_deepspeed(param: torch.nn.Parameter):
    """A ZeRO-3 partitioned parameter gathered whole inside the block (collective); else nothing."""
    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param])


def gather_objects(value) -> list:
    if world_size() == 1:
        return [value]
    out = [None] * world_size()
    dist.all_gather_object(out, value)
    return out
