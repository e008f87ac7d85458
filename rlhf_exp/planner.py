"""Memory planner: what a run needs, from the config alone (no weights loaded).

`python -m rlhf_exp stage=... model=... hardware=... plan=true` prints the table and a verdict;
a normal launch predicted not to fit stops before loading anything, with the table and what to
change. The estimate counts, per model the stage holds (policy, reference, reward model,
critic): weights (NF4 for 4-bit: 0.5 byte + quantization constants per weight), gradients
and optimizer states of what trains (AdamW: two states in the parameter dtype; 8-bit: two
bytes), bf16 copies of fp32 weights that autocast keeps for the backward pass, activations of
one micro batch (Korthikanti et al. 2022's per-layer count, adapted to a gated MLP, GQA and
fused attention; one layer's worth plus layer inputs with gradient checkpointing), the
vocabulary projection of the positions a loss reads, and the KV cache of rollouts. Sequence
lengths are the configured maxima, so the plan is an upper bound for typical batches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlhf_exp.distributed import deepspeed_stage, shards_weights
from rlhf_exp.ops.logprobs import chunk_rows

GIB = 2**30
NF4_BYTES = 0.5 + 1 / 64 * 1.0 + 1 / (64 * 256) * 4  # 4-bit weights, 8-bit absmax per 64, fp32 per 256 blocks
# Process / device overhead outside tensors: CUDA context and allocator slack on a GPU; on a
# CPU the interpreter, torch, transformers, tokenized data (measured here: ~0.7 GiB RSS).
OVERHEAD_GIB = {"cpu": 0.7, "cuda": 1.0}
# glibc's heap keeps most activation-sized blocks after they are freed, so a CPU run's resident
# peak exceeds its live tensors by about the activations again (measured on tiny models here:
# peak over live 0.5-1.7x the activations of SFT / DPO / GRPO).
CPU_ALLOCATOR_SLACK = 1.0
_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


@dataclass
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    gated_mlp: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def linear_params(self) -> int:
        """Decoder linear weights: what 4-bit quantizes and LoRA (all-linear) adapts."""
        kv = self.kv_heads * self.head_dim
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * kv
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        return self.layers * (attention + mlp)

    @property
    def lora_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of every adapted linear layer."""
        kv = self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        per_layer = [(h, h), (h, kv), (h, kv), (h, h)] + ([(h, i), (h, i), (i, h)] if self.gated_mlp else [(h, i), (i, h)])
        return per_layer * self.layers

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        norms = (2 * self.layers + 1) * self.hidden
        return self.linear_params + self.embedding_params + norms


@dataclass
class Plan:
    rows: list[tuple[str, str, float]] = field(default_factory=list)  # (model, what, bytes)
    available_gib: float | None = None
    device: str = "cpu"
    available_from: str = ""  # where available_gib comes from, when not the profile's figure
    notes: list[str] = field(default_factory=list)
    # role -> how its weights are held: {"linear": "nf4" | bytes per weight, "rest": bytes per weight}
    # (what tests compare with the models the stages build)
    held: dict[str, dict] = field(default_factory=dict)

    def add(self, model: str, what: str, nbytes: float) -> None:
        if nbytes > 0:
            self.rows.append((model, what, float(nbytes)))

    @property
    def tensors_gib(self) -> float:
        """What models and training add (the measured `memory/peak_over_baseline_gib`): all but the fixed overhead."""
        return sum(b for m, what, b in self.rows if not (m == "runtime" and "overhead" in what)) / GIB

    @property
    def total_gib(self) -> float:
        return sum(b for _, _, b in self.rows) / GIB

    @property
    def fits(self) -> bool | None:
        return None if self.available_gib is None else self.total_gib <= self.available_gib

    def table(self) -> str:
        lines = [f"{'model':<14}{'what':<46}{'GiB':>9}", "-" * 69]
        lines += [f"{m:<14}{w:<46}{b / GIB:>9.3f}" for m, w, b in self.rows]
        lines.append("-" * 69)
        lines.append(f"{'total':<60}{self.total_gib:>9.3f}")
        if self.available_gib is not None:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            where = f"{self.device}: {self.available_from}" if self.available_from else self.device
            lines.append(f"{'available (' + where + ')':<60}{self.available_gib:>9.3f}")
            lines.append(f"verdict: {verdict} ({self.total_gib / self.available_gib:.0%} of the memory)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def advice(self, cfg: DictConfig, micro_key: str) -> list[str]:
        """What to change, cheapest first, for a run that does not fit (`micro_key`: the stage's micro batch).
        Never empty: after the hardware levers come the sequence lengths, then the models themselves."""
        hardware, tips = cfg.hardware, []
        micro = OmegaConf.select(hardware, f"micro_batch_size.{micro_key}")
        if micro and micro > 1:
            tips.append(f"a smaller micro batch: hardware.micro_batch_size.{micro_key}={max(1, micro // 2)}")
        if not hardware.gradient_checkpointing:
            tips.append("hardware.gradient_checkpointing=true")
        if hardware.optimizer == "adamw":
            tips.append("an 8-bit optimizer: hardware.optimizer=paged_adamw_8bit")
        if not hardware.lora.enabled:
            tips.append("LoRA: hardware.lora.enabled=true")
        if not hardware.load_in_4bit:
            tips.append("QLoRA: hardware.lora.enabled=true hardware.load_in_4bit=true")
        if any(what.startswith("engine:") for _, what, _ in self.rows):
            share = float(hardware.vllm_gpu_memory_utilization)
            tips.append(f"a smaller vLLM share: hardware.vllm_gpu_memory_utilization={share / 2:.2f}, "
                        "or hardware.rollout_backend=hf")
        kv = [what for _, what, _ in self.rows if what.startswith("KV cache")]
        if kv and int(cfg.stage.get("batch_size") or 1) > 1:
            tips.append(f"fewer prompts per rollout (the KV cache): stage.batch_size={int(cfg.stage.batch_size) // 2}")
        data = cfg.get("data") or {}
        if data.get("max_prompt_tokens"):
            shorter = f"shorter sequences: data.max_prompt_tokens={max(1, int(data.max_prompt_tokens) // 2)}"
            new = OmegaConf.select(cfg, "stage.generation.max_new_tokens")
            if new:
                shorter += f" stage.generation.max_new_tokens={max(1, int(new) // 2)}"
            tips.append(shorter)
        tips.append(f"a smaller model (model={cfg.model.name} now" +
                    (", and its reward model at reward.fn.path)" if any(m in ("reward model", "critic")
                                                                        for m, _, _ in self.rows) else ")"))
        return tips


def model_shape(model_cfg: DictConfig, cache_dir: str | None = None) -> Shape:
    """The architecture, from `model.arch`, `model.config` (random init) or a folder's config.json."""
    from rlhf_exp.checkpoint_layout import weights_folder

    arch = None
    folder = model_cfg.get("init_from") or (model_cfg.path if model_cfg.source == "local" else None)
    folder = weights_folder(folder) if folder else None  # a LoRA checkpoint: the merged model's shape
    if folder and (Path(folder) / "config.json").is_file():
        arch = json.loads((Path(folder) / "config.json").read_text())
    elif model_cfg.get("arch"):
        arch = OmegaConf.to_container(model_cfg.arch, resolve=True)
    elif model_cfg.get("config"):
        arch = OmegaConf.to_container(model_cfg.config, resolve=True)
    if arch is None:
        from rlhf_exp.errors import ConfigError

        raise ConfigError("model.arch", f"the planner needs the shape of model={model_cfg.name}: add an `arch` "
                          "block (hidden_size, intermediate_size, num_hidden_layers, ...) to its config")
    vocab = arch.get("vocab_size")
    if vocab is None and cache_dir is not None:  # random init takes the tokenizer's size
        from rlhf_exp.models import load_tokenizer

        vocab = len(load_tokenizer(model_cfg, cache_dir))
    heads = arch.get("num_attention_heads") or arch.get("n_head")
    layers = int(model_cfg.get("num_layers") or arch.get("num_hidden_layers"))
    return Shape(hidden=arch["hidden_size"], intermediate=arch.get("intermediate_size") or arch.get("ffn_dim"),
                 layers=layers, heads=heads, kv_heads=arch.get("num_key_value_heads") or heads, vocab=int(vocab),
                 tied=bool(arch.get("tie_word_embeddings", True)), gated_mlp=arch.get("gated_mlp", True))


def layer_activation_bytes(shape: Shape, act_bytes: int) -> float:
    """Saved-for-backward bytes per token per decoder layer.

    Per token: norm inputs kept in fp32 (2 x 4H), normalized inputs to the projections
    (2 x H), q / k / v / rotated q, k / attention output (~5H + 4 kv), the gated MLP's gate,
    up, activation and product (4I) plus its inputs: in activation dtype (`act_bytes`).
    """
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    mlp = (4 * i + h) if shape.gated_mlp else (2 * i + h)
    return 8 * h + act_bytes * (2 * h + 5 * h + 4 * kv + mlp)


def trainable_params(shape: Shape, hardware: DictConfig, reward_head: bool) -> int:
    if hardware.lora.enabled:
        count = sum(hardware.lora.r * (fan_in + fan_out) for fan_in, fan_out in shape.lora_shapes)
    else:
        count = shape.params - (shape.vocab * shape.hidden if reward_head and not shape.tied else 0)
    return count + (shape.hidden + 1 if reward_head else 0)


def sharding(cfg: DictConfig, trains: bool) -> tuple[int, float, bool]:
    """(ranks N, fraction of the weights FSDP shards, whether optimizer states are sharded) for the
    model a torchrun `parallel=` mode trains (DeepSpeed ZeRO-3 as fsdp, ZeRO-2 as zero1); (1, 0, False)
    in one process."""
    parallel = cfg.get("parallel") or {}
    ranks = processes(cfg)
    if not trains or ranks == 1:
        return 1, 0.0, False
    weights = shards_weights(parallel)  # DeepSpeed ZeRO-2's gradients are counted whole
    return ranks, (1.0 if weights else 0.0), bool(weights or parallel.get("shard_optimizer") or deepspeed_stage(parallel))


def processes(cfg: DictConfig) -> int:
    """The ranks a torchrun run has (`parallel.processes`: WORLD_SIZE, or set for plan=true)."""
    return int((cfg.get("parallel") or {}).get("processes") or 1)


def add_model(plan: Plan, role: str, shape: Shape, cfg: DictConfig, *, trains: bool, quantized: bool,
              reward_head: bool = False, weight_bytes: int | None = None, rest_bytes: int | None = None) -> None:
    """Weights, and for a trained model its gradients, optimizer states and autocast copies (per rank
    under a sharded `parallel` mode: FSDP keeps 1/N of the transformer blocks plus one gathered block).
    A fully trained model's weights are fp32 masters (hardware.master_weights=fp32) whatever model.dtype.
    Under 16-bit autocast a LoRA policy's frozen LM head is kept in fp32 (`Trainer.trainable`); `rest_bytes`:
    all but the decoder's linear layers held in another dtype (a frozen copy's embeddings, norms and LM head)."""
    hardware = cfg.hardware
    lora = hardware.lora.enabled
    wbytes = weight_bytes or _DTYPE_BYTES[cfg.model.dtype]
    if trains and not lora and hardware.get("master_weights", "fp32") == "fp32":
        wbytes = 4
    autocast = hardware.precision != "fp32"
    head_in_fp32 = not reward_head and not quantized and wbytes < 4 and autocast and trains and lora
    params = shape.params - (shape.vocab * shape.hidden if reward_head and not shape.tied else 0)
    ranks, fsdp, shard_states = sharding(cfg, trains)
    if fsdp:
        blocks = shape.params - shape.embedding_params
        per_rank = params - blocks + blocks / ranks  # embeddings and heads stay replicated
        plan.add(role, f"weights ({wbytes * 8}-bit; blocks 1/{ranks})", per_rank * wbytes)
        plan.add(role, "one gathered transformer block", blocks / shape.layers * wbytes)
        plan.add(role, f"gradients (blocks 1/{ranks})", per_rank * wbytes)
        plan.add(role, f"optimizer states ({hardware.optimizer}; blocks 1/{ranks})", per_rank * 2 * wbytes)
        if hardware.precision != "fp32" and wbytes == 4:
            plan.add(role, "autocast 16-bit weight copies", (shape.vocab * shape.hidden + shape.linear_params) * 2)
        return
    if quantized:
        # bitsandbytes NF4 for the linear layers; the rest is cast to fp32 for training (peft's
        # prepare_model_for_kbit_training), or stays as loaded in a frozen model
        rest = 4 if trains else wbytes
        plan.add(role, "weights (linear layers NF4)", shape.linear_params * NF4_BYTES)
        plan.add(role, f"weights (embeddings, norms: {rest * 8}-bit)", (params - shape.linear_params) * rest)
        plan.held[role] = {"linear": "nf4", "rest": rest}
    elif rest_bytes and rest_bytes != wbytes:
        plan.add(role, f"weights (linear layers {wbytes * 8}-bit)", shape.linear_params * wbytes)
        plan.add(role, f"weights (embeddings, norms, head: {rest_bytes * 8}-bit)", (params - shape.linear_params) * rest_bytes)
        plan.held[role] = {"linear": wbytes, "rest": rest_bytes}
    else:
        plan.add(role, f"weights ({wbytes * 8}-bit)", params * wbytes)
        plan.held[role] = {"linear": wbytes, "rest": wbytes}
    if head_in_fp32:
        plan.add(role, "LM head kept in fp32 (beyond its 16-bit row)", shape.vocab * shape.hidden * (4 - wbytes))
    if not trains:
        return
    count = trainable_params(shape, hardware, reward_head)
    tbytes = 4 if lora else wbytes  # adapters are fp32
    if lora:
        plan.add(role, f"LoRA adapters (r={hardware.lora.r}, {count / 1e6:.1f}M)", count * tbytes)
    plan.add(role, "gradients", count * tbytes)
    state_bytes = 2 * tbytes if hardware.optimizer == "adamw" else 2  # two states; 8-bit: a byte each
    if shard_states:
        plan.add(role, f"optimizer states ({hardware.optimizer}; 1/{ranks}, zero1)", count * state_bytes / ranks)
    else:
        plan.add(role, f"optimizer states ({hardware.optimizer})", count * state_bytes)
    if hardware.precision != "fp32" and (wbytes == 4 or quantized):
        # autocast caches a 16-bit copy of each fp32 weight it casts, for the backward pass (4-bit
        # layers compute through bitsandbytes: only the fp32 LM head is cast; a scalar head has none)
        cast = (0 if reward_head else shape.vocab * shape.hidden) + (0 if quantized else shape.linear_params)
        plan.add(role, "autocast 16-bit weight copies", cast * 2)


def add_activations(plan: Plan, role: str, shape: Shape, cfg: DictConfig, sequences: int, tokens: int,
                    scored_tokens: int) -> None:
    """One micro batch's forward/backward: `sequences` x `tokens`, `scored_tokens` through the LM head."""
    act_bytes = 2 if cfg.hardware.precision != "fp32" else 4
    per_layer = layer_activation_bytes(shape, act_bytes) * sequences * tokens
    if cfg.hardware.gradient_checkpointing:
        stored = shape.layers * sequences * tokens * shape.hidden * 4 + per_layer  # layer inputs + one layer
        what = "activations (checkpointed)"
    else:
        stored = per_layer * shape.layers
        what = "activations"
    plan.add(role, f"{what}: {sequences} seq x {tokens} tok", stored)
    lora = cfg.hardware.lora
    if lora.enabled:
        # each adapted linear keeps its own input: a dropout copy (+ a 1-byte mask) in the residual dtype
        # while dropout is on (not in rm / dpo / grpo / ppo by default: p=0 returns the input itself),
        # and with 4-bit weights the base layer's cast to the compute dtype
        h, i = shape.hidden, shape.intermediate
        inputs = (6 * h + i) if shape.gated_mlp else (5 * h + i)  # q k v o gate up (down: i)
        residual = _DTYPE_BYTES[cfg.model.dtype]
        dropout_on = lora.dropout > 0 and not cfg.model.get("disable_dropout")
        per_token = inputs * ((residual + 1 if dropout_on else 0) + (2 if cfg.hardware.load_in_4bit else 0))
        layers = 1 if cfg.hardware.gradient_checkpointing else shape.layers
        plan.add(role, "activations: LoRA inputs (dropout copies, 4-bit casts)", per_token * layers * sequences * tokens)
    if scored_tokens:
        # fp32 logits, their log-softmax and gradient for the scored positions only, one chunk at a time
        at_once = min(scored_tokens, chunk_rows(shape.vocab))
        chunked = f" in chunks of {at_once}" if at_once < scored_tokens else ""
        plan.add(role, f"LM-head logits: {scored_tokens} positions{chunked}", at_once * shape.vocab * 4 * 3)


def plan_run(cfg: DictConfig) -> Plan:
    """The memory plan of the run `cfg` describes: the models and activations its stage declares
    (`StageSpec.memory`), then what the runtime adds."""
    from rlhf_exp.stages import stage_spec

    hardware = cfg.hardware
    device = "cuda" if str(hardware.device).startswith("cuda") else "cpu"
    plan = Plan(available_gib=_available_gib(hardware, device), device=device)
    if device == "cpu" and not hardware.get("memory_gb"):
        plan.available_from = cpu_memory_limit()[1]
    memory = stage_spec(cfg.stage.name).memory(cfg)
    policy = model_shape(cfg.model, cfg.paths.cache_dir)
    shapes = {"policy": policy, "reward": _reward_shape(cfg, policy)}
    if any(held.shape == "reward" for held in memory.models):  # which model those rows are, and where it comes from
        plan.notes.append(reward_shape_note(cfg, shapes["reward"], [h.role for h in memory.models if h.shape == "reward"]))
    for held in memory.models:
        quantized = bool(hardware.get("load_in_4bit")) if held.quantized is None else held.quantized
        add_model(plan, held.role, shapes[held.shape], cfg, trains=held.trains, quantized=quantized,
                  reward_head=held.reward_head, weight_bytes=held.weight_bytes, rest_bytes=held.rest_bytes)
    if memory.kv_cache is not None and hardware.get("rollout_backend") == "vllm" and plan.available_gib:
        utilization = float(hardware.vllm_gpu_memory_utilization)
        plan.add("vllm", f"engine: weights + KV cache ({utilization:.0%} of the GPU)", utilization * plan.available_gib * GIB)
    elif memory.kv_cache is not None:
        sequences, tokens = memory.kv_cache
        kv_bytes = 2 if hardware.precision != "fp32" else 4
        kv = sequences * tokens * policy.layers * 2 * policy.kv_heads * policy.head_dim * kv_bytes
        plan.add("policy", f"KV cache: rollout of {sequences} x {tokens} tok", kv)
    for act in memory.activations:
        add_activations(plan, act.role, shapes[act.shape], cfg, act.sequences, act.tokens, act.scored_tokens)
    plan.notes += memory.notes
    if device == "cpu":
        transient = sum(b for _, what, b in plan.rows if what.startswith(("activations", "LM-head", "KV cache")))
        plan.add("runtime", "freed activations glibc malloc keeps (~1x)", CPU_ALLOCATOR_SLACK * transient)
    plan.add("runtime", f"{device} overhead (context, interpreter, data)", OVERHEAD_GIB[device] * GIB)
    return plan


def reward_shape_note(cfg: DictConfig, shape: Shape, roles: list[str]) -> str:
    path = OmegaConf.select(cfg, "reward.fn.path", default=None)
    rows = " and ".join(roles)
    if not path:
        return (f"{rows}: no reward.fn.path yet, so planned at the policy's shape ({shape.layers} layers, hidden "
                f"{shape.hidden}); set it to plan the reward model you will use")
    return f"{rows}: the reward model at reward.fn.path={path} ({shape.layers} layers, hidden {shape.hidden})"


def _reward_shape(cfg: DictConfig, policy_shape: Shape) -> Shape:
    """The shape of the reward model at reward.fn.path (the policy's when it has none or is not on disk yet)."""
    path = OmegaConf.select(cfg, "reward.fn.path", default=None)
    if not path:
        return policy_shape
    from rlhf_exp.checkpoint_layout import weights_folder

    config = weights_folder(path) / "config.json"
    if not config.is_file():
        return policy_shape
    return model_shape(OmegaConf.create({"name": "reward", "source": "local", "path": str(config.parent),
                                         "num_layers": None}))


def _available_gib(hardware: DictConfig, device: str) -> float | None:
    if hardware.get("memory_gb"):
        return float(hardware.memory_gb)
    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else None
    return cpu_memory_limit()[0] / GIB


def cpu_memory_limit(cgroup_root: Path = Path("/sys/fs/cgroup")) -> tuple[int, str]:
    """(bytes, where the limit comes from): the least of the machine's RAM, the cgroup's memory limit (a
    container, a SLURM job, systemd: cgroup v2 `memory.max`, v1 `memory/memory.limit_in_bytes`) and the
    process's address-space limit (`ulimit -v`), which is what an allocation actually runs into."""
    import os
    import resource

    limits = [(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "the machine's RAM")]
    for path in (cgroup_root / "memory.max", cgroup_root / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append((int(text), f"the cgroup's limit ({path})"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append((int(soft), "the address-space limit (ulimit -v)"))
    return min(limits)
