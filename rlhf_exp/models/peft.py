"""LoRA and QLoRA (peft + bitsandbytes NF4) for every stage, and merge-and-export.

`hardware.lora.enabled` wraps the trainable model in LoRA adapters; `hardware.load_in_4bit`
also loads the frozen base in 4-bit NF4 (QLoRA, Dettmers et al. 2023: NF4, double
quantization, bf16 compute). The reference of DPO / GRPO / PPO is then the same model with its
adapters disabled (`AdaptersDisabled`), so no second copy is held.

Checkpoint layout with LoRA: the folder holds the adapters (what a resumed run loads onto the
base); the final checkpoint also gets `merged/`, a plain Hugging Face folder with the adapters
merged into float base weights (4-bit bases are reloaded in float for this, the usual QLoRA
export), which `AutoModelForCausalLM.from_pretrained` loads without peft.

Merging never writes the trained model: `merged_weights` computes each merged weight out of place,
one layer at a time. peft's `merge_adapter()` / `unmerge_adapter()` in place on a bf16 base do not
round trip, so a base merged and unmerged at every vLLM weight sync drifts, and under LoRA that base
is also the KL reference (huggingface/trl#6688: 28% of the mean |W| after 100 cycles).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator

import torch
from omegaconf import DictConfig
from torch import nn

from rlhf_exp.checkpoint_layout import ADAPTER_WEIGHTS

log = logging.getLogger(__name__)



def uses_lora(hardware: DictConfig | None) -> bool:
    return bool(hardware is not None and hardware.get("lora") and hardware.lora.enabled)


def quantization_config(hardware: DictConfig | None):
    """bitsandbytes NF4 config for QLoRA, or None."""
    if hardware is None or not hardware.get("load_in_4bit"):
        return None
    from rlhf_exp.runtime import DTYPES, choose_precision

    return nf4_config(DTYPES[choose_precision(hardware.precision, str(hardware.device))[0]])


def nf4_config(compute_dtype: torch.dtype):
    """bitsandbytes' 4-bit NF4 with double quantization (QLoRA's), computing in `compute_dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def lora_config(hardware: DictConfig, task_type: str):
    from peft import LoraConfig

    lora = hardware.lora
    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                      bias="none", task_type=task_type, init_lora_weights=lora.get("init_weights", True))


def add_adapters(model: nn.Module, hardware: DictConfig, task_type: str = "CAUSAL_LM") -> nn.Module:
    """Freeze `model` and wrap it in fresh LoRA adapters (B = 0, so it starts equal to the base)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if is_4bit(model):
        keep_4bit_differentiable(model)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(hardware.get("gradient_checkpointing")))
    peft_model = get_peft_model(model, lora_config(hardware, task_type))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA r=%d on %s: %.2fM trainable of %.1fM parameters", hardware.lora.r, hardware.lora.target_modules,
             trainable / 1e6, total / 1e6)
    return peft_model


def is_4bit(model: nn.Module) -> bool:
    """Whether any weight of `model` is a bitsandbytes 4-bit parameter (also for inner modules,
    which lack the `is_loaded_in_4bit` flag of the model that was loaded)."""
    return any(type(p).__name__ == "Params4bit" for p in model.parameters())


def keep_4bit_differentiable(model: nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel.

    On an AVX-512 bf16 CPU, a `Linear4bit` run in eval mode without gradients (an evaluation, a
    rollout) repacks its weight for `gemv_4bit`, which has no autograd: later training steps
    then pass no gradient back through the frozen base, so every adapter below the last layer
    gets a wrong gradient, silently (bitsandbytes 0.50).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def is_peft(model: nn.Module) -> bool:
    # by duck type: importing peft pulls in bitsandbytes, which full fine-tuning never needs
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def load_adapter_weights(model: nn.Module, folder: str | Path) -> None:
    """Adapters saved by `save_pretrained` of a PeftModel, loaded onto a freshly wrapped one."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        from rlhf_exp.errors import ConfigError

        raise ConfigError("stage.resume_from", f"{folder} has no LoRA adapters ({ADAPTER_WEIGHTS}); "
                          "was it saved with hardware.lora.enabled=true?")
    result = set_peft_model_state_dict(model, load_file(str(path)))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"adapters in {folder} do not fit this model: unexpected {unexpected[:3]}")


def plain_name(peft_name: str, adapter_prefix: str = "lora_") -> str | None:
    """The name a PeftModel's parameter has in the plain model its adapters merge into; None for an
    adapter's own weight (and for the frozen original beside a `modules_to_save` copy)."""
    if adapter_prefix in peft_name or "original_module" in peft_name:
        return None
    name = peft_name.removeprefix("base_model.model.").replace(".base_layer", "")
    return name.replace("modules_to_save.default.", "")


def merged_weights(peft_model: nn.Module, device: str | torch.device | None = None
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name in the plain model, tensor) for every parameter of the model `peft_model`'s LoRA adapters merge
    into. A merged weight is computed out of place, (base in fp32 + B A scaling) cast to the base's dtype, one
    layer at a time; nothing of `peft_model` is written. `device`: where the tensors go (None: where they are,
    the unmerged ones then the model's own)."""
    from peft.tuners.lora import LoraLayer

    layers = {f"{name}.base_layer.weight": module for name, module in peft_model.named_modules()
              if isinstance(module, LoraLayer)}
    for name, param in peft_model.named_parameters():
        plain = plain_name(name, getattr(peft_model, "prefix", "lora_"))
        if plain is None:
            continue
        tensor = param.detach()
        layer = layers.get(name)
        if layer is not None:
            if layer.merged:
                raise RuntimeError(f"{name}: adapters are merged into the module; merged_weights merges out of place")
            adapters = [a for a in layer.active_adapters if a in layer.lora_A.keys()]
            if adapters:
                delta = sum(layer.get_delta_weight(a).float() for a in adapters)
                tensor = (tensor.float() + delta).to(tensor.dtype)
        yield plain, tensor if device is None else tensor.to(device)


def merged_copy_on_cpu(peft_model: nn.Module) -> nn.Module:
    """A plain model (no peft) on the CPU whose weights are `merged_weights(peft_model)`: the trained model is
    neither written nor copied on its device (a deep copy of a 7B model on the GPU is another 14.5 GiB)."""
    import copy

    prefix = getattr(peft_model, "prefix", "lora_")
    merged = dict(merged_weights(peft_model, device="cpu"))
    memo: dict[int, torch.Tensor] = {}
    for name, param in peft_model.named_parameters():
        plain = plain_name(name, prefix)
        # adapter weights: placeholders, dropped with the LoRA layers by unload() below
        tensor = merged[plain] if plain is not None else torch.empty(0)
        memo[id(param)] = nn.Parameter(tensor, requires_grad=False)
    for buffer in peft_model.buffers():
        memo[id(buffer)] = buffer.detach().to("cpu", copy=True)
    clone = copy.deepcopy(peft_model, memo)  # the structure, with the tensors above in place of the device's
    return clone.unload()  # peft: the LoRA layers replaced by their base layers, nothing merged again


def merged_float_copy(peft_model: nn.Module, build_float_base: Callable[[], nn.Module], hardware: DictConfig,
                      task_type: str = "CAUSAL_LM") -> nn.Module:
    """The adapters of `peft_model` merged into a float copy of its base, on the CPU.

    A float base is merged out of place (`merged_copy_on_cpu`); a 4-bit base is rebuilt in float by
    `build_float_base` (merging into NF4 weights would round the adapters away) and the adapters are
    copied onto it.
    """
    from peft import get_peft_model, set_peft_model_state_dict

    if not is_4bit(peft_model):
        return merged_copy_on_cpu(peft_model)
    fresh = get_peft_model(build_float_base(), lora_config(hardware, task_type))
    set_peft_model_state_dict(fresh, adapter_state(peft_model))
    return merged_copy_on_cpu(fresh)


class AdaptersDisabled(nn.Module):
    """The base of a LoRA model as a module: calls run with the adapters switched off.

    The frozen reference of DPO / GRPO / PPO under LoRA, sharing every weight with the policy.
    Not registered as a child, so it adds no parameters anywhere. `module` (default: the whole
    model) is what a call runs, e.g. the decoder body.
    """

    def __init__(self, peft_model: nn.Module, module: nn.Module | None = None):
        super().__init__()
        object.__setattr__(self, "peft_model", peft_model)
        object.__setattr__(self, "module", module if module is not None else peft_model)

    def forward(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.module(*args, **kwargs)

    @property
    def config(self):
        return self.peft_model.config

    @property
    def base_model(self) -> nn.Module:
        """The decoder body, run with adapters disabled (what `ops.logprobs.decoder` calls)."""
        return AdaptersDisabled(self.peft_model, self.peft_model.get_base_model().base_model)

    def get_output_embeddings(self) -> nn.Module:
        return self.peft_model.get_output_embeddings()  # the LM head carries no adapter (all-linear skips it)
