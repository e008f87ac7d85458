"""`make gpu-check`: what only a GPU can show, in one command of at most ten minutes, written to a JSON and a
markdown report.

    python -m rlhf_exp.gpu_check [--dry] [--out DIR] [--layers-7b N]

1. The machine: torch and its CUDA, the GPU, and which packages the checks import that are missing there
   (`--bundle DIR`, run where pip reaches PyPI, downloads them as wheels for a machine without a network).
2. The tests marked `gpu` (`pytest -m gpu`): on a machine without CUDA each is skipped with its reason printed.
3. Measured checks of the CUDA paths: packed against padded log-probs and gradients in bf16 (SDPA's default
   kernels, this project's kernel set without cuDNN, eager), at a row width of 64 mod 128; gradient
   checkpointing with LoRA on the reward-model and policy paths; a QLoRA step with paged 8-bit AdamW; the
   out-of-place merged copy over 100 syncs; the sampler's reproducibility; every model a PPO run holds (dtype,
   quantization, bytes) against the memory planner; a Llama-2-7B-shaped QLoRA SFT step's peak against the
   planner's figure; the reduction helper on an NCCL group of one.

`--dry` runs the same checks on the CPU at small sizes (the test suite runs it); nothing in it needs a GPU.
Each check's result is written as soon as it is known, so a check that runs out of time loses only itself.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
# what the checks and the gpu tests import beyond what a CUDA machine with torch, transformers, peft and accelerate
# has (the device tool's H100 / H200 image: KINDS.md); module -> the wheels that bring it
NEEDED = {"omegaconf": ["omegaconf", "antlr4-python3-runtime==4.9.3"], "hydra": ["hydra-core"],
          "bitsandbytes": ["bitsandbytes"], "peft": ["peft"], "transformers": ["transformers"],
          "accelerate": ["accelerate"], "safetensors": ["safetensors"], "pytest": ["pytest"], "tqdm": ["tqdm"]}
TOKENIZER_FOLDER = "tokenizer"  # in a --bundle folder: the tiny model's tokenizer, for a machine without the GGUF


@dataclass
class Context:
    device: torch.device
    dry: bool
    bundle: Path | None
    layers_7b: int

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


# ------------------------------------------------------------------ the machine
def environment() -> dict:
    def version(name: str) -> str | None:
        from importlib.metadata import PackageNotFoundError, version as installed

        try:
            return installed(name)
        except PackageNotFoundError:
            return None

    out = {"python": platform.python_version(), "machine": platform.machine(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "packages": {name: version(name) for name in ("transformers", "peft", "accelerate", "bitsandbytes",
                                                         "hydra-core", "omegaconf", "flash-attn", "vllm",
                                                         "liger-kernel", "deepspeed", "mlflow")}}
    missing = [module for module in NEEDED if importlib.util.find_spec(module) is None]
    out["missing_modules"] = missing
    out["wheels_needed"] = sorted({wheel for module in missing for wheel in NEEDED[module]})
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        out.update(gpu=props.name, capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   gpu_memory_gib=round(total / 2**30, 1), gpu_free_gib=round(free / 2**30, 1),
                   cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            out["driver"] = smi.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            out["driver"] = None
    return out


# ------------------------------------------------------------------ small models of random weights
def llama(ctx: Context, hidden: int, layers: int, vocab: int = 512, attn: str = "sdpa", intermediate: int | None = None,
          heads: int = 4, kv_heads: int = 2, dtype: torch.dtype = torch.float32):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                  vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(ctx.device)


def hardware_cfg(**overrides):
    from omegaconf import OmegaConf

    lora = {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
    return OmegaConf.create({"lora": lora, "gradient_checkpointing": False, "load_in_4bit": False,
                             "precision": "bf16", "device": "cuda", **overrides})


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ------------------------------------------------------------------ the checks
def check_packed_against_padded(ctx: Context) -> dict:
    """Log-probs and gradients of prompt-packed rows against padded rows, in bf16 autocast over fp32 weights.
    Rows are 192 = 64 mod 128 wide, the width at which cuDNN attention's backward gave NaN (pytorch#196678)."""
    from rlhf_exp.data.collate import TokenizedSFT
    from rlhf_exp.ops.logprobs import response_logprobs
    from rlhf_exp.ops.shared_prefix import masked_attention_kernels, packed_response_logprobs

    hidden, layers = (64, 2) if ctx.dry else (512, 4)
    generator = torch.Generator().manual_seed(1)
    items = []
    for lengths in ((28, 30, 34), (40, 26, 26)):  # prompt 100 + responses 92: packed rows of 192 tokens
        prompt = torch.randint(3, 500, (100,), generator=generator).tolist()
        items += [TokenizedSFT(prompt, torch.randint(3, 500, (n,), generator=generator).tolist()) for n in lengths]
    out, ok = {}, True
    for name, attn, kernels in (("sdpa_default", "sdpa", contextlib.nullcontext), ("sdpa_no_cudnn", "sdpa",
                                masked_attention_kernels), ("eager", "eager", contextlib.nullcontext)):
        model = llama(ctx, hidden, layers, attn=attn)
        results = []
        for packed in (True, False):
            model.zero_grad()
            with kernels(), torch.autocast(ctx.device.type, dtype=torch.bfloat16):
                if packed:
                    logps, mask, _ = packed_response_logprobs(model, items, 0, ctx.device)
                else:
                    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(x.prompt_ids + x.response_ids) for x in items],
                                                          batch_first=True)
                    logps, mask, _ = response_logprobs(model, ids.to(ctx.device), torch.tensor([100] * len(items)),
                                                       torch.tensor([len(x.response_ids) for x in items]))
                loss = -(logps * mask).sum() / mask.sum()
                loss.backward()
            grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
            results.append((logps.detach(), grads))
        (packed_logps, packed_grads), (padded_logps, padded_grads) = results
        finite = bool(torch.isfinite(packed_logps).all() and torch.isfinite(packed_grads).all())
        figures = {"finite": finite, "max_abs_logp_diff": max_abs(packed_logps, padded_logps),
                   "grad_rel_diff": float((packed_grads - padded_grads).norm() / padded_grads.norm())}
        out[name] = figures
        if name != "sdpa_default":  # the default kernels are reported, not required (they are the fault)
            ok &= finite and figures["max_abs_logp_diff"] < 0.1 and figures["grad_rel_diff"] < 0.05
    return {"ok": ok, **out}


def check_gradient_checkpointing_with_lora(ctx: Context) -> dict:
    """Adapter gradients with gradient checkpointing equal those without, on the RM path and the policy path."""
    from rlhf_exp.models import enable_activation_checkpointing

    from rlhf_exp.models.peft import add_adapters
    from rlhf_exp.models.reward import add_reward_adapters, reward_model_from_causal_lm

    hidden, layers = (64, 2) if ctx.dry else (512, 4)
    ids = torch.randint(3, 500, (2, 96), generator=torch.Generator().manual_seed(2)).to(ctx.device)
    out = {}
    for path in ("policy", "reward model"):
        grads = []
        for checkpointing in (False, True):
            torch.manual_seed(3)
            base = llama(ctx, hidden, layers)
            model = add_adapters(base, hardware_cfg()) if path == "policy" else \
                add_reward_adapters(reward_model_from_causal_lm(base), hardware_cfg())
            model = model.to(ctx.device)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.normal_(0, 0.1)
            if checkpointing:
                enable_activation_checkpointing(model)
            model.train()
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
                value = model(input_ids=ids).logits.float().logsumexp(-1).mean() if path == "policy" else \
                    model(ids, torch.tensor([96, 80], device=ctx.device)).sum()
            value.backward()
            grads.append(torch.cat([p.grad.flatten().float() for n, p in model.named_parameters()
                                    if "lora_" in n and p.grad is not None]))
        plain, checkpointed = grads
        out[path] = {"adapter_grads": int(plain.numel()), "grad_rel_diff": float((plain - checkpointed).norm() / plain.norm())}
    return {"ok": all(v["adapter_grads"] > 0 and v["grad_rel_diff"] < 1e-2 for v in out.values()), **out}


def quantized_llama(ctx: Context, hidden: int, layers: int, vocab: int, intermediate: int, heads: int, kv_heads: int):
    """A random-weight Llama loaded in 4-bit NF4 as the stages load one (bitsandbytes quantizes while loading)."""
    from transformers import AutoModelForCausalLM

    from rlhf_exp.models.peft import nf4_config

    with tempfile.TemporaryDirectory() as folder:
        float_model = llama(ctx, hidden, layers, vocab=vocab, intermediate=intermediate, heads=heads, kv_heads=kv_heads,
                            dtype=torch.bfloat16)
        float_model.save_pretrained(folder, safe_serialization=True)
        del float_model
        if ctx.cuda:
            torch.cuda.empty_cache()
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map={"": str(ctx.device)},
                                                    quantization_config=nf4_config(torch.bfloat16))


def check_qlora_paged_adamw(ctx: Context) -> dict:
    """One QLoRA step with paged 8-bit AdamW: a finite loss, adapters that moved, 4-bit weights that did not."""
    from rlhf_exp.models import enable_activation_checkpointing

    from omegaconf import OmegaConf

    from rlhf_exp.models.loading import upcast_trainable
    from rlhf_exp.models.peft import add_adapters, is_4bit
    from rlhf_exp.optim import build_optimizer

    hidden, layers = (64, 2) if ctx.dry else (1024, 4)
    model = upcast_trainable(add_adapters(quantized_llama(ctx, hidden, layers, 512, 2 * hidden, 4, 2),
                                          hardware_cfg(load_in_4bit=True, gradient_checkpointing=True)))
    enable_activation_checkpointing(model)
    stage = OmegaConf.create({"lr": 1e-3, "adam_betas": [0.9, 0.999], "weight_decay": 0.0})
    optimizer = build_optimizer(model, stage, "paged_adamw_8bit")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.randint(3, 500, (2, 64), generator=torch.Generator().manual_seed(4)).to(ctx.device)
    with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    moved = sum(not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if p.requires_grad)
    kept = all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    return {"ok": bool(torch.isfinite(loss)) and moved > 0 and kept and is_4bit(model) and bool(frozen),
            "loss": float(loss), "adapters_moved": moved, "four_bit_weights": len(frozen), "four_bit_unchanged": kept,
            "optimizer": type(optimizer).__name__}


def check_merged_copy(ctx: Context) -> dict:
    """100 vLLM-style weight syncs of a bf16 LoRA model: the base bit-identical, each merged weight rounded once."""
    from peft.tuners.lora import LoraLayer

    from rlhf_exp.models.loading import upcast_trainable
    from rlhf_exp.models.peft import add_adapters, merged_weights

    model = upcast_trainable(add_adapters(llama(ctx, 64 if ctx.dry else 1024, 2, dtype=torch.bfloat16), hardware_cfg()))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    received = {}
    for _ in range(100):
        received = dict(merged_weights(model))
    moved = [n for n, p in model.named_parameters() if "lora_" not in n and not torch.equal(p, base[n])]
    wrong = []
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            weight = layer.base_layer.weight
            exact = (weight.float() + layer.get_delta_weight("default").float()).to(weight.dtype)
            if not torch.equal(received[name.removeprefix("base_model.model.") + ".weight"], exact):
                wrong.append(name)
    return {"ok": not moved and not wrong, "syncs": 100, "base_weights_moved": len(moved), "merged_wrong": len(wrong)}


def check_sampler_reproducibility(ctx: Context) -> dict:
    """The built-in sampler on the device: the same generator seed gives the same tokens, another seed others."""
    from rlhf_exp.rollout.generation import generate

    model = llama(ctx, 64 if ctx.dry else 512, 2).eval()
    prompts = [list(range(5, 25)), list(range(30, 42))]

    def draw(seed: int) -> list[list[int]]:
        generator = torch.Generator(device=ctx.device).manual_seed(seed)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
            return generate(model, prompts, repeats=3, pad_token_id=0, stop_token_ids=[2], max_new_tokens=24,
                            temperature=1.0, top_k=0, top_p=1.0, generator=generator)

    first, again, other = draw(7), draw(7), draw(8)
    return {"ok": first == again and first != other, "same_seed_same_tokens": first == again,
            "other_seed_other_tokens": first != other}


def tiny_overrides(ctx: Context) -> list[str]:
    """The tiny test model's settings on this machine: its tokenizer from the bundle where the GGUF is missing."""
    overrides = ["model=tiny", "hardware.device=" + ctx.device.type, "hardware.precision=bf16", "model.dtype=bfloat16"]
    from rlhf_exp.config import compose_config
    from rlhf_exp.models.embedded import gguf_available

    tiny = compose_config(["model=tiny"])
    if not gguf_available(tiny.model.tokenizer, tiny.paths.cache_dir):  # a machine without a network: the bundle's
        folder = ctx.bundle / TOKENIZER_FOLDER if ctx.bundle else None
        if folder is None or not folder.is_dir():
            raise RuntimeError("the tiny model's tokenizer: `python -m rlhf_exp.launch.fetch_model` (online) or pass "
                               "--bundle DIR made by --bundle")
        overrides += ["model.tokenizer.source=local", f"++model.tokenizer.path={folder}"]
    return overrides


def check_held_models_against_the_plan(ctx: Context) -> dict:
    """A PPO run with a reward model (the RTX 4090 seed's shape at a tiny size; QLoRA where bitsandbytes runs):
    each held model's dtype, quantization and weight bytes against the memory planner's rows."""
    from rlhf_exp.config import compose_config, resolved
    from rlhf_exp.models import load_causal_lm, load_tokenizer
    from rlhf_exp.models.reward import reward_model_from_causal_lm
    from rlhf_exp.planner import GIB, plan_run
    from rlhf_exp.stages.ppo import PPOTrainer
    from rlhf_exp.tracking import Tracker

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        base = tiny_overrides(ctx) + [f"paths.runs_dir={folder / 'runs'}", "tracking=none"]
        cfg = resolved(compose_config(base))
        tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
        reward_model_from_causal_lm(load_causal_lm(cfg.model, cfg.paths.cache_dir, tokenizer)).save_pretrained(folder / "rm")
        tokenizer.save_pretrained(folder / "rm")
        cfg = resolved(compose_config(base + [
            "stage=ppo", "stage.batch_size=2", "stage.minibatch_size=2", "stage.eval_examples=2",
            "stage.generation.max_new_tokens=4", "data.max_prompt_tokens=48", "reward=reward_model",
            f"reward.fn.path={folder / 'rm'}", "hardware.lora.enabled=true", "hardware.lora.r=4",
            "hardware.load_in_4bit=true", "hardware.micro_batch_size.ppo=2"]))
        trainer = PPOTrainer(cfg, Tracker(), folder / "run")
        trainer.setup()
        built = {"policy": trainer.policy, "reward model": trainer.rewards.reward_model, "critic": trainer.model.critic}
        plan = plan_run(cfg)
        out, ok = {}, True
        for role, model in built.items():
            held = held_as(model)
            nbytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
            planned = sum(b for m, what, b in plan.rows if m == role and what.startswith(("weights", "LM head")))
            out[role] = {"built": held, "planned": plan.held.get(role), "weights_gib": round(nbytes / GIB, 4),
                         "planned_weights_gib": round(planned / GIB, 4)}
            # the planner counts the LM head and a reward model's lm_head-free body by shape: within 10%
            ok &= held == plan.held.get(role) and abs(nbytes - planned) <= 0.1 * planned
        trainer.close()
    return {"ok": ok, **out}


def held_as(model) -> dict:
    """How a built model holds its weights, in the planner's terms (`Plan.held`): the decoder's linear layers ("nf4"
    or bytes per weight) and the rest (embeddings, norms); adapters, the scalar head and the LM head (its own planner
    row; a tied input embedding is it) left out. A mix of dtypes comes back as a list, which no plan equals."""
    linear, rest = set(), set()
    get_head = getattr(model, "get_output_embeddings", None)
    lm_head = get_head().weight if callable(get_head) and get_head() is not None else None
    for name, param in model.named_parameters():
        if "lora_" in name or name.startswith("head.") or "lm_head" in name or param is lm_head:
            continue
        if type(param).__name__ == "Params4bit":
            linear.add("nf4")
        elif name.endswith("proj.weight") or name.endswith("proj.base_layer.weight"):
            linear.add(param.dtype.itemsize)
        else:
            rest.add(param.dtype.itemsize)
    return {"linear": linear.pop() if len(linear) == 1 else sorted(map(str, linear)),
            "rest": rest.pop() if len(rest) == 1 else sorted(map(str, rest))}


def check_7b_qlora_step_against_the_plan(ctx: Context) -> dict:
    """A Llama-2-7B-shaped model (random weights, `--layers-7b` of its 32 layers) in QLoRA with paged 8-bit AdamW and
    gradient checkpointing, one SFT step of 2 x 1024 tokens: the GPU's peak against the planner's tensors."""
    from rlhf_exp.models import enable_activation_checkpointing

    from omegaconf import OmegaConf

    from rlhf_exp.config import compose_config
    from rlhf_exp.losses import sft_loss
    from rlhf_exp.models.loading import upcast_trainable
    from rlhf_exp.models.peft import add_adapters
    from rlhf_exp.ops.logprobs import masked_next_token_logprobs
    from rlhf_exp.optim import build_optimizer
    from rlhf_exp.planner import GIB, plan_run

    if ctx.dry:
        hidden, intermediate, layers, heads, vocab, micro, tokens = 128, 256, 2, 4, 512, 2, 128
    else:
        hidden, intermediate, layers, heads, vocab, micro, tokens = 4096, 11008, ctx.layers_7b, 32, 32000, 2, 1024
    overrides = ["model=llama2_7b", "hardware=rtx4090", "stage=sft", f"hardware.micro_batch_size.sft={micro}",
                 f"model.num_layers={layers}", f"data.max_prompt_tokens={tokens // 2}",
                 f"data.max_response_tokens={tokens // 2 - 1}"]
    if ctx.dry:
        overrides += [f"model.arch.hidden_size={hidden}", f"model.arch.intermediate_size={intermediate}",
                      f"model.arch.num_hidden_layers={layers}", f"model.arch.num_attention_heads={heads}",
                      f"model.arch.num_key_value_heads={heads}", f"model.arch.vocab_size={vocab}"]
    plan = plan_run(compose_config(overrides))
    if ctx.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    start = time.perf_counter()
    model = quantized_llama(ctx, hidden, layers, vocab, intermediate, heads, heads)
    model = upcast_trainable(add_adapters(model, hardware_cfg(load_in_4bit=True, gradient_checkpointing=True,
                                                              lora={"enabled": True, "r": 16, "alpha": 32,
                                                                    "dropout": 0.05, "target_modules": "all-linear"})))
    enable_activation_checkpointing(model)
    optimizer = build_optimizer(model, OmegaConf.create({"lr": 2e-4, "adam_betas": [0.9, 0.999], "weight_decay": 0.0}),
                                "paged_adamw_8bit")
    ids = torch.randint(3, vocab, (micro, tokens), generator=torch.Generator().manual_seed(5)).to(ctx.device)
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, tokens // 2:] = True
    with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
        logps = masked_next_token_logprobs(model, ids, None, response)
    mask = response[:, 1:].to(logps.dtype)
    loss = sft_loss(logps, mask, mask.sum())
    loss.backward()
    optimizer.step()
    out = {"layers": layers, "loss": float(loss), "seconds": round(time.perf_counter() - start, 1),
           "planned_tensors_gib": round(plan.tensors_gib, 3), "planned_total_gib": round(plan.total_gib, 3)}
    if ctx.cuda:
        peak = (torch.cuda.max_memory_allocated() - baseline) / GIB
        out.update(peak_allocated_gib=round(peak, 3), peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 3))
        # an upper bound that is not loose by more than half, as the CPU test of the planner asks
        out["ok"] = bool(torch.isfinite(loss)) and peak <= 1.1 * plan.tensors_gib and plan.tensors_gib <= 1.5 * peak
    else:
        out.update(ok=bool(torch.isfinite(loss)), peak_allocated_gib=None, note="no allocator peak on a CPU")
    del model, optimizer
    return out


def check_nccl_group_of_one(ctx: Context) -> dict:
    """The collective helper on a process group of one: NCCL beside gloo on a GPU (`distributed.init`'s group),
    gloo alone on a CPU. The tensor handed to all_reduce must live on the group's device."""
    import socket

    import torch.distributed as dist

    from rlhf_exp import distributed

    if dist.is_initialized():
        return {"ok": False, "error": "a process group already exists in this process"}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, 1, True)
    if ctx.cuda:
        torch.cuda.set_device(0)
        dist.init_process_group("cpu:gloo,cuda:nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
    else:
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        summed = distributed.all_reduce_sum(torch.tensor([1.0, 2.0], dtype=torch.float64))
        device = distributed.collective_device()
        out = {"backend": str(dist.get_backend()), "collective_device": str(device), "sum_device": str(summed.device),
               "values": summed.cpu().tolist()}
        out["ok"] = summed.device.type == ("cuda" if ctx.cuda else "cpu") and out["values"] == [1.0, 2.0]
        return out
    finally:
        dist.destroy_process_group()


CHECKS: list[tuple[str, Callable[[Context], dict]]] = [
    ("packed_against_padded", check_packed_against_padded),
    ("gradient_checkpointing_with_lora", check_gradient_checkpointing_with_lora),
    ("qlora_paged_adamw_step", check_qlora_paged_adamw),
    ("merged_copy_over_100_syncs", check_merged_copy),
    ("sampler_reproducibility", check_sampler_reproducibility),
    ("held_models_against_the_plan", check_held_models_against_the_plan),
    ("nccl_group_of_one", check_nccl_group_of_one),
    ("llama2_7b_qlora_step_against_the_plan", check_7b_qlora_step_against_the_plan),  # the longest: last
]


# ------------------------------------------------------------------ the tests marked gpu
def gpu_tests(ctx: Context, timeout: int) -> dict:
    """`pytest -m gpu -rs`: passed / failed / skipped counts and the skip reasons (a CPU machine skips them all)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if ctx.bundle:
        env["RLHF_EXP_GPU_BUNDLE"] = str(ctx.bundle)
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider",
               str(ROOT / "tests" / "test_gpu.py")]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"pytest -m gpu ran past {timeout} s"}
    text = done.stdout + done.stderr
    summary = next((line for line in reversed(text.splitlines()) if " in " in line and ("passed" in line
                    or "skipped" in line or "failed" in line or "error" in line)), "")
    counts = {word: int(n) for n, word in (part.strip().split(" ", 1)[:2] for part in
              summary.strip("= ").split(" in ")[0].split(",") if part.strip()[:1].isdigit())}
    skips = [line.split("] ", 1)[-1] if "] " in line else line for line in text.splitlines() if line.startswith("SKIPPED")]
    print(text, flush=True)
    return {"ok": done.returncode in (0, 5) and not counts.get("failed") and not counts.get("errors"),
            "returncode": done.returncode, "counts": counts, "skipped_reasons": skips, "summary": summary}


# ------------------------------------------------------------------ the report
def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# make gpu-check{' DRY=1' if report['dry'] else ''}", "",
             f"- device: {report['device']} ({env.get('gpu', 'no GPU')}"
             + (f", compute capability {env['capability']}, {env['gpu_memory_gib']} GiB, driver {env.get('driver')}"
                if env.get("gpu") else "") + ")",
             f"- torch {env['torch']} (CUDA {env['torch_cuda']}), Python {env['python']} on {env['machine']}",
             "- packages: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v),
             f"- missing here: {', '.join(env['missing_modules']) or 'none'}; wheels to carry: "
             f"{', '.join(env['wheels_needed']) or 'none'}", "",
             f"## tests marked gpu: {report['gpu_tests'].get('summary') or report['gpu_tests'].get('error', '')}", ""]
    lines += [f"- skipped: {reason}" for reason in report["gpu_tests"].get("skipped_reasons", [])]
    lines += ["", "## measured checks", "", "| check | ok | figures |", "|---|---|---|"]
    for name, result in report["checks"].items():
        figures = {k: v for k, v in result.items() if k not in ("ok", "traceback")}
        lines.append(f"| {name} | {'yes' if result.get('ok') else '**NO**'} | `{json.dumps(figures)[:600]}` |")
    lines += ["", f"all ok: {report['ok']} ({report['seconds']} s)"]
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(report))


def run(ctx: Context, out: Path, only: list[str] | None = None, test_timeout: int = 240) -> dict:
    started = time.perf_counter()
    report = {"dry": ctx.dry, "device": str(ctx.device), "environment": environment(), "gpu_tests": {}, "checks": {},
              "ok": False, "seconds": 0.0}
    print(json.dumps(report["environment"], indent=2), flush=True)
    report["gpu_tests"] = gpu_tests(ctx, test_timeout)
    write(report, out)
    for name, check in CHECKS:
        if only and name not in only:
            continue
        began = time.perf_counter()
        try:
            result = check(ctx)
        except Exception as error:  # a check that breaks is a failed check, with its traceback in the JSON
            result = {"ok": False, "error": f"{type(error).__name__}: {str(error)[:500]}",
                      "traceback": traceback.format_exc()[-4000:]}
        result["seconds"] = round(time.perf_counter() - began, 2)
        report["checks"][name] = result
        print(f"{name}: {'ok' if result.get('ok') else 'FAILED'} {json.dumps({k: v for k, v in result.items() if k != 'traceback'})[:400]}",
              flush=True)
        if ctx.cuda:
            torch.cuda.empty_cache()
        report["seconds"] = round(time.perf_counter() - started, 1)
        write(report, out)
    report["ok"] = bool(report["gpu_tests"].get("ok")) and all(r.get("ok") for r in report["checks"].values())
    report["seconds"] = round(time.perf_counter() - started, 1)
    write(report, out)
    return report


def bundle(folder: Path) -> None:
    """What a CUDA machine without a network needs beside its torch, transformers, peft and accelerate: the wheels
    of NEEDED's packages it lacks (for x86-64, CPython 3.12, as the device tool's machines run) and the tiny model's
    tokenizer (the GGUF is too large to carry)."""
    from rlhf_exp.config import compose_config
    from rlhf_exp.models import load_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    cfg = compose_config(["model=tiny"])
    load_tokenizer(cfg.model, cfg.paths.cache_dir).save_pretrained(folder / TOKENIZER_FOLDER)
    from importlib.metadata import version

    # the versions this project's tests ran with here; pure-Python ones built as wheels (antlr4 4.9.3, which
    # omegaconf 2.3 needs, is on PyPI as a source archive only), bitsandbytes as PyPI's x86-64 CUDA wheel
    pure = [f"{name}=={version(name)}" for name in ("hydra-core", "omegaconf", "antlr4-python3-runtime")]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(folder / "wheels"), *pure], check=True)
    platforms = [arg for n in ("2_28", "2_27", "2_24", "2_17") for arg in ("--platform", f"manylinux_{n}_x86_64")]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", *platforms, "--platform", "manylinux2014_x86_64",
                    "-d", str(folder / "wheels"), f"bitsandbytes=={version('bitsandbytes')}"], check=True)
    print(f"{folder}: carry it, then: python3 -m pip install -q --no-index --no-deps --target /tmp/site "
          f"{folder}/wheels/*.whl && PYTHONPATH=/tmp/site:. python3 -m rlhf_exp.gpu_check --bundle {folder}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_exp.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="the same checks on the CPU at small sizes")
    parser.add_argument("--out", type=Path, default=Path("gpu_check"), help="where gpu_check.json / .md go")
    parser.add_argument("--bundle", type=Path, default=None, help="a folder made by --make-bundle (tokenizer, wheels)")
    parser.add_argument("--make-bundle", type=Path, default=None, help="download what a machine without a network needs")
    parser.add_argument("--layers-7b", type=int, default=32, help="decoder layers of the 7B-shaped step (of 32)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these checks")
    args = parser.parse_args(argv)
    if args.make_bundle:
        bundle(args.make_bundle)
        return 0
    if not args.dry and not torch.cuda.is_available():
        print("make gpu-check: torch sees no CUDA GPU here; `make gpu-check DRY=1` runs the checks on the CPU",
              file=sys.stderr)
        return 2
    ctx = Context(device=torch.device("cpu" if args.dry else "cuda"), dry=args.dry, bundle=args.bundle,
                  layers_7b=args.layers_7b)
    report = run(ctx, args.out, args.only)
    print(f"\n{markdown(report)}\nwritten: {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.md'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
