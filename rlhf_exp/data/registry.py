"""Every `data.format`, by name: the one place that knows them all (each format's class lives in its own module,
which builds on `rlhf_exp.data.formats.DataFormat`)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from rlhf_exp.data.formats import DataFormat, HhRlhfFormat, JsonlFormat, ShareGptFormat, TldrFormat
from rlhf_exp.data.hf import TYPES, HfFormat, typed_format
from rlhf_exp.data.math_problems import ArithmeticFormat, Gsm8kFormat
from rlhf_exp.errors import ConfigError

FORMATS: dict[str, type[DataFormat]] = {
    "tldr": TldrFormat,
    "hh_rlhf": HhRlhfFormat,
    "jsonl": JsonlFormat,
    "sharegpt": ShareGptFormat,
    "arithmetic": ArithmeticFormat,
    "gsm8k": Gsm8kFormat,
    # data=hub / data=file: TRL's types, detected from the columns (trl) or named
    "trl": HfFormat,
    **{kind: typed_format(kind) for kind in TYPES},
}


def get_format(cfg: DictConfig, tokenizer, cache_dir: str | Path | None = None) -> DataFormat:
    """The format `data.format` names (`cache_dir`: where work worth keeping between runs goes)."""
    if cfg.format not in FORMATS:
        raise ConfigError("data.format", f"unknown format {cfg.format!r}; known: {sorted(FORMATS)}")
    return FORMATS[cfg.format](cfg, tokenizer, cache_dir)


def is_chat(cfg: DictConfig, tokenizer) -> bool:
    """Whether responses are chat turns (ended by the template's end of turn): ShareGPT's, HH-RLHF's through a
    template, a conversational data=hub / data=file set's."""
    return get_format(cfg, tokenizer).chat
