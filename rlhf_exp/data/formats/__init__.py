"""Every `data.format`, by name: the one place that knows them all. Each format is a module of its own here,
building on `base.DataFormat`:

  tldr.py           data=tldr        Reddit posts and summaries, the judged summary pairs
  hh_rlhf.py        data=hh_rlhf     Anthropic's helpful / harmless dialogues
  jsonl.py          data=jsonl       named fields of a JSON lines file
  sharegpt.py       data=sharegpt    ShareGPT conversations
  math_problems.py  data=arithmetic, data=gsm8k: problems with checkable answers
  hf.py             data=hub, data=file: any Hugging Face data set in TRL's dataset types

A new format: a module here with its DataFormat subclass, a line in FORMATS, and a conf/data/<name>.yaml.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from rlhf_exp.data.formats.base import DataFormat, Document, LabelledExample, PreferenceExample, SFTExample
from rlhf_exp.data.formats.hf import TYPES, HfFormat, source_label, typed_format
from rlhf_exp.data.formats.hh_rlhf import HhRlhfFormat
from rlhf_exp.data.formats.jsonl import JsonlFormat
from rlhf_exp.data.formats.math_problems import ArithmeticFormat, Gsm8kFormat
from rlhf_exp.data.formats.sharegpt import ShareGptFormat
from rlhf_exp.data.formats.tldr import TldrFormat
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


def data_name(cfg: DictConfig) -> str:
    """A short name for run names, the `data` tag and MLflow's data sets: the conf/data option, else the file's or
    the hub set's own name (data=file data.path=prefs.parquet -> prefs), never "None"."""
    if cfg.get("name"):
        return str(cfg.name)
    path = str(cfg.get("path") or "").rstrip("/")
    return Path(path).name.split(".")[0] if path else str(cfg.get("source") or "data")


def data_label(cfg: DictConfig) -> str:
    """How messages name the data: the conf/data option, or for data=hub / data=file the source itself."""
    return source_label(cfg) if cfg.format in ("trl", *TYPES) else str(cfg.name)


__all__ = ["FORMATS", "DataFormat", "Document", "LabelledExample", "PreferenceExample", "SFTExample", "data_label", "data_name", "get_format",
           "is_chat"]
