"""One way in for every model the stages use.

`model.source` picks where weights come from:
  gguf    the embedded GGUF (converted once to safetensors under paths.cache_dir)
  hub     a Hugging Face hub id (`model.path`); needs a network or a warm HF cache
  local   a saved folder (`model.path`)
  config  random init from `model.config` (tiny test models)
`model.init_from` (a checkpoint folder of an earlier run) overrides the source.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from rlhf_exp.errors import ConfigError
from rlhf_exp.runtime import dtype_of
from rlhf_exp.checkpoint_layout import weights_folder
from rlhf_exp.models.peft import add_adapters, load_adapter_weights, quantization_config, uses_lora
from rlhf_exp.models.embedded import float_checkpoint

log = logging.getLogger(__name__)

def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off everywhere, whether a module (nn.Dropout, LoRA's) or a rate kept as a number (Llama's
    attention_dropout; OPT's dropout, activation_dropout and layerdrop). The preference and RL stages do
    this by default, as TRL and the N+ paper do: dropout noise between two forwards of the same policy
    makes the first PPO ratio differ from 1 and adds noise to every log-ratio and KL."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        rates = [name for name, value in vars(module).items()
                 if isinstance(value, float) and (name.endswith("dropout") or name == "layerdrop")]
        for name in rates:
            setattr(module, name, 0.0)
    return model


def upcast_trainable(model: torch.nn.Module) -> torch.nn.Module:
    """Trainable parameters in fp32 (master weights); frozen ones stay as loaded. bf16 keeps 8 bits of
    mantissa: bf16(0.02) + 1e-5 == 0.02, so a bf16 weight updated in place at lr 1e-5 mostly never moves.
    Compute stays in bf16 through autocast (hardware.precision)."""
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def head_in_fp32(model: torch.nn.Module) -> torch.nn.Module:
    """The LM head's weight in fp32 (and so a tied input embedding's): log-probs are read from fp32 logits
    (`ops.logprobs.head_logprobs` runs the head outside autocast), where a bf16 logit of 20 is rounded to
    1/8. A model without an LM head (a reward model) is returned as it is."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None and head.weight.is_floating_point() and head.weight.dtype != torch.float32:
        head.weight.data = head.weight.data.float()
    return model


def frozen_copy(model: torch.nn.Module, compute_dtype: torch.dtype, rest_dtype: torch.dtype = torch.float32
                ) -> torch.nn.Module:
    """A frozen copy of `model` that computes as the policy does under autocast: the decoder's linear weights in
    the compute dtype (what autocast casts the policy's to at every forward, and never keeps for weights without
    gradients), everything else (embeddings, norms, the LM head) in `rest_dtype`, the policy's master dtype. A
    copy all in bf16 ran its residual stream in bf16 where the policy's is fp32: its log-probs differed from the
    starting policy's (KL > 0 at step 0)."""
    import copy

    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    get_head = getattr(frozen, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    for module in frozen.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.is_floating_point():
                continue
            linear = isinstance(module, torch.nn.Linear) and module is not head
            param.data = param.data.to(compute_dtype if linear else rest_dtype)
    for buffer in frozen.buffers():
        if buffer.is_floating_point() and buffer.dtype != torch.float32:
            buffer.data = buffer.data.to(rest_dtype)
    return head_in_fp32(frozen)


def _folder_for(spec: dict[str, Any], cache_dir: str, key: str) -> str:
    """Where from_pretrained reads for a spec with source gguf / hub / local."""
    source = spec.get("source")
    if source == "gguf":
        return str(float_checkpoint(spec, cache_dir, key))
    if source in ("hub", "local"):
        path = spec.get("path")
        if not path:
            raise ConfigError(f"{key}.path", f"source={source} needs a path")
        if source == "local" and not Path(path).is_dir():
            raise ConfigError(f"{key}.path", f"folder not found: {path}")
        return str(path)
    raise ConfigError(f"{key}.source", f"cannot load weights or a tokenizer from source={source!r}")


def is_gated_refusal(error: BaseException) -> bool:
    """The hub refused a gated repository (Llama-2, Mistral) to a caller without an accepted licence or token:
    huggingface_hub's GatedRepoError anywhere in the chain, or transformers' wording of it."""
    while error is not None:
        if type(error).__name__ == "GatedRepoError" or "gated repo" in str(error).lower():
            return True
        error = error.__cause__ or error.__context__
    return False


def _from_pretrained(loader, where: str, key: str, **kwargs):
    try:
        return loader.from_pretrained(where, **kwargs)
    except OSError as exc:
        if is_gated_refusal(exc):
            raise ConfigError(f"{key}.path", f"{where} is a gated model: accept its licence on its hub page, then "
                              "set HF_TOKEN to a read token (docker compose passes the host's HF_TOKEN)") from None
        raise ConfigError(
            f"{key}.path",
            f"could not load {where!r} ({exc.__class__.__name__}: {str(exc).splitlines()[0]}). "
            "Hub ids need a network or a warm Hugging Face cache; offline, use a local folder "
            "(model.source=local model.path=/folder) or the embedded model=smollm2_135m.",
        ) from exc


def load_tokenizer(model_cfg: DictConfig, cache_dir: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with an explicit pad token (masks never rely on it: see data.collate)."""
    spec = _tokenizer_spec(model_cfg)
    where = _folder_for(spec, cache_dir, key="model.tokenizer" if model_cfg.get("tokenizer") else "model")
    tokenizer = _from_pretrained(AutoTokenizer, where, "model", trust_remote_code=model_cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token is None:
        raise ConfigError("model.tokenizer", f"the tokenizer at {where} has no EOS token")
    return tokenizer


def _tokenizer_spec(model_cfg: DictConfig) -> dict[str, Any]:
    if model_cfg.get("init_from"):
        return {"source": "local", "path": str(weights_folder(model_cfg.init_from))}
    if model_cfg.get("tokenizer"):
        return OmegaConf.to_container(model_cfg.tokenizer, resolve=True)
    return OmegaConf.to_container(model_cfg, resolve=True)


def generation_eos_ids(generation_config) -> list[int]:
    """The ids a generation config ends a generation with (an int, a list, or none)."""
    eos = getattr(generation_config, "eos_token_id", None)
    return [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]


def with_generation_stops(stop_ids: list[int], model) -> list[int]:
    """`stop_ids` (EOS, then the token responses are trained to end with) and every id `model`'s generation config
    ends a generation with, placed before the last: sampling stopped only at the EOS and the template's end of
    turn, so a model whose generation config lists more (Qwen2.5-Instruct's <|endoftext|> beside <|im_end|>)
    ran on past them to the length cap."""
    extra = [i for i in generation_eos_ids(getattr(model, "generation_config", None)) if i not in stop_ids]
    return [*stop_ids[:-1], *extra, stop_ids[-1]] if extra else list(stop_ids)


def load_causal_lm(model_cfg: DictConfig, cache_dir: str, tokenizer: PreTrainedTokenizerBase,
                   hardware: DictConfig | None = None, adapters: bool = True):
    """A causal LM in training mode, weights in `model.dtype`.

    With `hardware`: loaded in 4-bit NF4 when `hardware.load_in_4bit`, and wrapped in fresh LoRA
    adapters when `hardware.lora.enabled` (unless `adapters=False`); `model.adapter_from` (a LoRA
    checkpoint, set when resuming) loads its adapters.
    """
    dtype = dtype_of(model_cfg.dtype)
    quantization = quantization_config(hardware)
    common = dict(dtype=dtype, attn_implementation=model_cfg.attn_implementation,
                  trust_remote_code=model_cfg.trust_remote_code)
    if quantization is not None:
        common["quantization_config"] = quantization
    if model_cfg.get("init_from"):
        model = _from_pretrained(AutoModelForCausalLM, _folder_for(
            {"source": "local", "path": str(weights_folder(model_cfg.init_from))}, cache_dir, "model.init_from"),
            "model.init_from", **common)
    elif model_cfg.source == "config":
        model = _random_init(model_cfg, tokenizer, dtype, quantization)
    else:
        model = _from_pretrained(AutoModelForCausalLM, _folder_for(
            OmegaConf.to_container(model_cfg, resolve=True), cache_dir, "model"), "model", **common)
    if model_cfg.get("num_layers"):
        keep_first_layers(model, int(model_cfg.num_layers))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # the tokenizer's EOS, and every id the model's own generation config ends a generation with (Qwen2.5-Instruct
    # lists <|im_end|> and <|endoftext|>): `data.tokens.with_generation_stops` makes them all stop a response
    ends = list(dict.fromkeys([tokenizer.eos_token_id, *generation_eos_ids(model.generation_config)]))
    model.generation_config.eos_token_id = ends[0] if len(ends) == 1 else ends
    if adapters and uses_lora(hardware):
        model = add_adapters(model, hardware)
        if model_cfg.get("adapter_from"):
            load_adapter_weights(model, model_cfg.adapter_from)
    model.train()
    return model


def _decoder_layers(model) -> torch.nn.ModuleList:
    base = model.base_model
    for holder in (base, getattr(base, "decoder", None)):  # Llama / Qwen / Mistral; OPT
        layers = getattr(holder, "layers", None)
        if isinstance(layers, torch.nn.ModuleList):
            return holder
    raise ConfigError("model.num_layers", f"cannot find the decoder layers of {type(model).__name__}")


def keep_first_layers(model, num_layers: int) -> None:
    """Drop all but the first `num_layers` decoder layers (the config follows, so saving works)."""
    holder = _decoder_layers(model)
    total = len(holder.layers)
    if not 0 < num_layers <= total:
        raise ConfigError("model.num_layers", f"must be in 1..{total} for this model (got {num_layers})")
    holder.layers = holder.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = model.config.layer_types[:num_layers]


def _random_init(model_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype, quantization=None):
    if "config" not in model_cfg:
        raise ConfigError("model.config", "source=config needs a `config` mapping (model_type, hidden_size, ...)")
    arch = OmegaConf.to_container(model_cfg.config, resolve=True)
    model_type = arch.pop("model_type")
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **arch)
    config._attn_implementation = model_cfg.attn_implementation
    # Its own seed: the same weights whenever the model is built (a QLoRA export rebuilds the base).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(model_cfg.get("init_seed") or 0))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if quantization is None:
        return model
    # bitsandbytes quantizes while loading: write the (seeded) random weights once and reload them.
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, safe_serialization=True)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=quantization,
                                                    attn_implementation=model_cfg.attn_implementation)
