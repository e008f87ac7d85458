"""Data: sources (vendored / file / hub), formats (TL;DR, HH-RLHF, JSON lines, ShareGPT),
honest splits, tokenizing and padding. Knows nothing of stages or tracking."""

from __future__ import annotations

from collections import Counter

from omegaconf import DictConfig

from rlhf_exp.data.formats import PreferenceExample, SFTExample, get_format
from rlhf_exp.data.splits import split_by_phase, split_by_prompt
from rlhf_exp.errors import ConfigError


def _split(examples: list, data_cfg: DictConfig, seed: int, kind: str):
    if data_cfg.get("phase"):
        return _phase_split(examples, data_cfg, seed, kind)
    if len(examples) <= data_cfg.val_size:
        raise ConfigError("data.val_size", f"{data_cfg.val_size} leaves no training data: "
                          f"data={data_cfg.name} has {len(examples)} {kind} examples")
    train, val = split_by_prompt(examples, data_cfg.val_size, seed)
    if data_cfg.get("max_train_examples"):
        train = train[: data_cfg.max_train_examples]
    return train, val


EVAL_PHASE = "eval"  # data.phase=eval: only the held-out prompts every phase shares (stage=eval in a pipeline)


def _phase_split(examples: list, data_cfg: DictConfig, seed: int, kind: str):
    shares = dict(data_cfg.phase_split)
    if data_cfg.phase == EVAL_PHASE:
        _, val = split_by_phase(examples, next(iter(shares)), shares, data_cfg.phase_held_out, seed)
        return [], val[: data_cfg.val_size]
    if data_cfg.phase not in shares:
        raise ConfigError("data.phase", f"{data_cfg.phase!r} has no share in data.phase_split ({shares})")
    train, val = split_by_phase(examples, data_cfg.phase, shares, data_cfg.phase_held_out, seed)
    if not train:
        raise ConfigError("data.phase_split", f"phase {data_cfg.phase!r} gets none of the {len(examples)} {kind} "
                          f"examples of data={data_cfg.name} (shares {shares})")
    if data_cfg.get("max_train_examples"):
        train = train[: data_cfg.max_train_examples]
    return train, val[: data_cfg.val_size]


def load_sft_splits(data_cfg: DictConfig, tokenizer, seed: int, skipped: Counter | None = None,
                    cache_dir: str | None = None) -> tuple[list[SFTExample], list[SFTExample]]:
    """(train, val) prompt/completion examples, split by prompt with `seed`; `skipped` gets the bad
    rows dropped under data.on_bad_row=skip, by reason; `cache_dir` keeps work for the next run."""
    data = get_format(data_cfg, tokenizer, cache_dir)
    examples = data.sft_examples()
    if skipped is not None:
        skipped.update(data.skipped)
    return _split(examples, data_cfg, seed, "SFT")


def load_preference_splits(data_cfg: DictConfig, tokenizer, seed: int, skipped: Counter | None = None,
                           cache_dir: str | None = None):
    """(train, val) prompt/chosen/rejected pairs, split by prompt with `seed` (`skipped`, `cache_dir`: as above)."""
    data = get_format(data_cfg, tokenizer, cache_dir)
    examples = data.preference_examples()
    if skipped is not None:
        skipped.update(data.skipped)
    return _split(examples, data_cfg, seed, "preference")


__all__ = ["SFTExample", "PreferenceExample", "load_sft_splits", "load_preference_splits"]
