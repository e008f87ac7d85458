"""Data: sources (vendored / file / hub), formats (TL;DR, HH-RLHF, JSON lines, ShareGPT),
honest splits, tokenizing and padding. Knows nothing of stages or tracking."""

from __future__ import annotations

from collections import Counter

from omegaconf import DictConfig

from rlhf_exp.data.formats import PreferenceExample, SFTExample, get_format
from rlhf_exp.data.hf import data_label
from rlhf_exp.data.splits import split_by_phase, split_by_prompt
from rlhf_exp.errors import ConfigError


def _split(examples: list, data_cfg: DictConfig, seed: int, kind: str):
    if data_cfg.get("phase"):
        return _phase_split(examples, data_cfg, seed, kind)
    if len(examples) <= data_cfg.val_size:
        raise ConfigError("data.val_size", f"{data_cfg.val_size} leaves no training data: "
                          f"data={data_label(data_cfg)} has {len(examples)} {kind} examples")
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
                          f"examples of data={data_label(data_cfg)} (shares {shares})")
    if data_cfg.get("max_train_examples"):
        train = train[: data_cfg.max_train_examples]
    return train, val[: data_cfg.val_size]


def blended_examples(data_cfg: DictConfig, tokenizer, seed: int, kind: str, skipped: Counter | None = None,
                     cache_dir: str | None = None) -> list:
    """The examples of `kind` ("sft" | "preference" | "prompt") of data_cfg's source, then of each `data.blend` source
    (another conf/data option) taken `weight` times (0.5: a seeded half of them; 2: each twice), as
    DeepSpeed-Chat blends data sets before it splits them by phase. The split is by prompt, so a prompt
    repeated by a weight stays on one side of it."""
    from rlhf_exp.data.formats import is_chat

    sources = [(data_cfg, 1.0, "data")]
    chat = is_chat(data_cfg, tokenizer)
    for name, weight in (data_cfg.get("blend") or {}).items():
        other = blend_source(name)
        if is_chat(other, tokenizer) != chat:
            raise ConfigError(f"data.blend.{name}", f"data={name} is {'not ' if chat else ''}"
                              f"chat and data={data_label(data_cfg)} is{'' if chat else ' not'}: "
                              "responses would end with different tokens")
        other.max_prompt_tokens, other.max_response_tokens = data_cfg.max_prompt_tokens, data_cfg.max_response_tokens
        sources.append((other, float(weight), f"data.blend.{name}"))
    examples: list = []
    for source_cfg, weight, _ in sources:
        data = get_format(source_cfg, tokenizer, cache_dir)
        found = {"sft": data.sft_examples, "preference": data.preference_examples,
                 "prompt": data.prompt_examples}[kind]()
        if skipped is not None:
            skipped.update(data.skipped)
        examples += resample(list(found), weight, seed)
    return examples


def blend_source(name: str) -> DictConfig:
    from rlhf_exp.config import compose_config, config_group_options

    if name not in config_group_options("data"):
        raise ConfigError(f"data.blend.{name}", f"no conf/data/{name}.yaml (data options: "
                          f"{', '.join(config_group_options('data'))})")
    return compose_config([f"data={name}"]).data


def resample(examples: list, weight: float, seed: int) -> list:
    """`examples` taken `weight` times: whole copies, then a seeded sample for the fraction."""
    import random

    whole, fraction = int(weight), weight - int(weight)
    return examples * whole + random.Random(seed).sample(examples, round(fraction * len(examples)))


def load_sft_splits(data_cfg: DictConfig, tokenizer, seed: int, skipped: Counter | None = None,
                    cache_dir: str | None = None) -> tuple[list[SFTExample], list[SFTExample]]:
    """(train, val) prompt/completion examples, split by prompt with `seed`; `skipped` gets the bad
    rows dropped under data.on_bad_row=skip, by reason; `cache_dir` keeps work for the next run."""
    return _split(blended_examples(data_cfg, tokenizer, seed, "sft", skipped, cache_dir), data_cfg, seed, "SFT")


def load_prompt_splits(data_cfg: DictConfig, tokenizer, seed: int, skipped: Counter | None = None,
                       cache_dir: str | None = None) -> tuple[list[SFTExample], list[SFTExample]]:
    """(train, val) prompts to sample from, with their reference responses where the data has them (GRPO,
    PPO, eval; a prompt-only data set's references are empty)."""
    return _split(blended_examples(data_cfg, tokenizer, seed, "prompt", skipped, cache_dir), data_cfg, seed, "prompt")


def load_preference_splits(data_cfg: DictConfig, tokenizer, seed: int, skipped: Counter | None = None,
                           cache_dir: str | None = None):
    """(train, val) prompt/chosen/rejected pairs, split by prompt with `seed` (`skipped`, `cache_dir`: as above)."""
    return _split(blended_examples(data_cfg, tokenizer, seed, "preference", skipped, cache_dir), data_cfg, seed,
                  "preference")


__all__ = ["SFTExample", "PreferenceExample", "load_sft_splits", "load_preference_splits", "load_prompt_splits"]
