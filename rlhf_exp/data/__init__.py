"""Data: sources (vendored / file / hub), formats (TL;DR, HH-RLHF, JSON lines, ShareGPT),
honest splits, tokenizing and padding. Knows nothing of stages or tracking."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlhf_exp.data.formats import PreferenceExample, SFTExample, data_label, get_format
from rlhf_exp.data.splits import split_by_phase, split_by_prompt
from rlhf_exp.data.tokens import NO_TEMPLATE
from rlhf_exp.errors import ConfigError


def _split(examples: list, data_cfg: DictConfig, seed: int, kind: str):
    if not examples:  # not a val_size problem: there is nothing to split
        from rlhf_exp.errors import DataError

        where = data_cfg.get("path") or f"data={data_label(data_cfg)}"
        has_rows = data_cfg.get("path") and Path(str(data_cfg.path)).is_file() and Path(str(data_cfg.path)).stat().st_size
        raise DataError(where, f"holds no {kind} examples" + (
            " (its rows were all dropped as bad rows, or lack the fields this stage reads)" if has_rows
            else ": the file is empty"
            if data_cfg.get("path") else ""))
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


def data_tokenizer(model_cfg: DictConfig, data_cfg: DictConfig, cache_dir: str):
    """(the model's tokenizer with data.chat_template in place, the ids that end a response): EOS, and for chat
    data the template's end of turn too, which responses are trained to end with and sampling stops at."""
    from rlhf_exp.data.tokens import stop_token_ids, with_chat_template
    from rlhf_exp.models import load_tokenizer

    tokenizer = with_chat_template(load_tokenizer(model_cfg, cache_dir), data_cfg)
    return tokenizer, stop_token_ids(tokenizer, get_format(data_cfg, tokenizer).chat)


def source_configs(data_cfg: DictConfig) -> list[tuple[DictConfig, float, str]]:
    """(config, weight, key) of each source read: data.sources' entries, else data_cfg's own source and each
    data.blend option, as the config's resolution made them whole (rlhf_exp.config.resolve_data_sources). A
    source's responses must end as the others' do (all chat turns, or none)."""
    if data_cfg.get("sources"):
        return [source_config(entry, f"data.sources[{index}]") for index, entry in enumerate(data_cfg.sources)]
    own = OmegaConf.create(OmegaConf.to_container(data_cfg, resolve=True))  # read_sources fills in its caps
    return [(own, 1.0, "data")] + [source_config(entry, f"data.blend.{name}")
                                   for name, entry in (data_cfg.get("blend") or {}).items()]


def source_config(entry, key: str) -> tuple[DictConfig, float, str]:
    """A resolved data.sources / data.blend entry: (the data config it reads, its weight, its key)."""
    if not hasattr(entry, "items") or "format" not in entry or "weight" not in entry:
        raise ConfigError(key, "is not resolved into a whole data config: load data with a config made by "
                          "rlhf_exp.config.resolved (as every run's is)")
    config = OmegaConf.create({k: v for k, v in entry.items() if k not in ("data", "weight")})
    return config, float(entry["weight"]), key


def read_sources(data_cfg: DictConfig, tokenizer, seed: int, kind: str, skipped: Counter | None = None,
                 cache_dir: str | None = None) -> list[tuple[DictConfig, list]]:
    """Each source's examples of `kind` ("sft" | "preference" | "prompt" | "unpaired") taken `weight` times (0.5: a seeded
    half of them; 2: each twice), as DeepSpeed-Chat blends data sets; [(source config, examples)]."""
    sources = source_configs(data_cfg)
    chat = None  # the first source's: every other's responses must end as its do
    read = []
    for source_cfg, weight, key in sources:
        source_cfg.max_prompt_tokens, source_cfg.max_response_tokens = data_cfg.max_prompt_tokens, data_cfg.max_response_tokens
        data = get_format(source_cfg, tokenizer, cache_dir)
        if chat is None:
            chat = data.chat
        elif data.chat and not chat and data.has_turns:
            # dialogues mixed into plain-text data (hh_rlhf into tldr) come as plain text, ending as it does
            source_cfg.chat_template = NO_TEMPLATE
        if data.chat != chat:
            raise ConfigError(key, f"{data_label(source_cfg)} is {'not ' if chat else ''}chat and "
                              f"{data_label(sources[0][0])} is{'' if chat else ' not'}: responses would end with "
                              "different tokens")
        found = {"sft": data.sft_examples, "preference": data.preference_examples,
                 "prompt": data.prompt_examples, "unpaired": data.unpaired_examples}[kind]()
        if skipped is not None:
            skipped.update(data.skipped)
        read.append((source_cfg, resample(list(found), weight, seed)))
    return read


def blended_examples(data_cfg: DictConfig, tokenizer, seed: int, kind: str, skipped: Counter | None = None,
                     cache_dir: str | None = None) -> list:
    """Every source's examples of `kind` in one list (see `read_sources`)."""
    return [example for _, examples in read_sources(data_cfg, tokenizer, seed, kind, skipped, cache_dir)
            for example in examples]


def load_splits(data_cfg: DictConfig, tokenizer, seed: int, kind: str, skipped: Counter | None = None,
                cache_dir: str | None = None) -> tuple[list, list]:
    """(train, val) of `kind`, split by prompt with `seed`. data.sources: each source split on its own (its
    val_size; every source's phase portion), so each is held out in proportion; else all sources as one."""
    import random

    label = {"sft": "SFT", "preference": "preference", "prompt": "prompt", "unpaired": "labelled (KTO)"}[kind]
    if not data_cfg.get("sources"):
        return _split(blended_examples(data_cfg, tokenizer, seed, kind, skipped, cache_dir), data_cfg, seed, label)
    train, val = [], []
    for source_cfg, examples in read_sources(data_cfg, tokenizer, seed, kind, skipped, cache_dir):
        for name in ("phase", "phase_split", "phase_held_out"):
            source_cfg[name] = data_cfg[name]
        source_cfg.max_train_examples = None
        part_train, part_val = _split(examples, source_cfg, seed, label)
        train, val = train + part_train, val + part_val
    random.Random(seed + 1).shuffle(train)
    if data_cfg.get("max_train_examples"):
        train = train[: data_cfg.max_train_examples]
    return train, val


def resample(examples: list, weight: float, seed: int) -> list:
    """`examples` taken `weight` times: whole copies, then a seeded sample for the fraction."""
    import random

    whole, fraction = int(weight), weight - int(weight)
    return examples * whole + random.Random(seed).sample(examples, round(fraction * len(examples)))


def load_sft_splits(data_cfg: DictConfig, tokenizer, seed: int, skipped: Counter | None = None,
                    cache_dir: str | None = None) -> tuple[list[SFTExample], list[SFTExample]]:
    """(train, val) prompt/completion examples, split by prompt with `seed`; `skipped` gets the bad
    rows dropped under data.on_bad_row=skip, by reason; `cache_dir` keeps work for the next run."""
    return load_splits(data_cfg, tokenizer, seed, "sft", skipped, cache_dir)


def load_prompt_splits(data_cfg: DictConfig, tokenizer, seed: int, skipped: Counter | None = None,
                       cache_dir: str | None = None) -> tuple[list[SFTExample], list[SFTExample]]:
    """(train, val) prompts to sample from, with their reference responses where the data has them (GRPO,
    PPO, eval; a prompt-only data set's references are empty)."""
    return load_splits(data_cfg, tokenizer, seed, "prompt", skipped, cache_dir)


def load_preference_splits(data_cfg: DictConfig, tokenizer, seed: int, skipped: Counter | None = None,
                           cache_dir: str | None = None):
    """(train, val) prompt/chosen/rejected pairs, split by prompt with `seed` (`skipped`, `cache_dir`: as above)."""
    return load_splits(data_cfg, tokenizer, seed, "preference", skipped, cache_dir)


def load_unpaired_splits(data_cfg: DictConfig, tokenizer, seed: int, skipped: Counter | None = None,
                         cache_dir: str | None = None):
    """(train, val) responses labelled desirable or not (KTO), split by prompt: a pair's two halves stay together."""
    return load_splits(data_cfg, tokenizer, seed, "unpaired", skipped, cache_dir)


__all__ = ["SFTExample", "PreferenceExample", "load_sft_splits", "load_preference_splits", "load_prompt_splits"]
