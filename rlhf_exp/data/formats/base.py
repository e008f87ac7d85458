"""The examples every format makes (SFTExample, Document, PreferenceExample), the `DataFormat` base class each
format builds on, and the checks and helpers several formats share.

Each format yields text examples; tokenization and padding live in `rlhf_exp.data.collate`. Responses
exclude the EOS token, which the tokenizer step appends as an id.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from omegaconf import DictConfig

from rlhf_exp.data.sources import Record
from rlhf_exp.data.tokens import NO_TEMPLATE
from rlhf_exp.errors import ConfigError, DataError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    completion: str
    origin: str = ""
    # the data row's other columns (an `answer`, a `solution`), which reward functions read by name as TRL passes
    # them; a conversational prompt's messages under "prompt" (reward functions get those, not the rendered text)
    row: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def split_key(self) -> str:
        """What keeps rows together in a split: the prompt (its rows never straddle train and held-out)."""
        return self.prompt


@dataclass(frozen=True)
class Document(SFTExample):
    """A text modelled whole (TRL's standard language modelling): its prompt is only the start-of-document
    token, so each document is its own group in a split."""

    @property
    def split_key(self) -> str:
        return self.prompt + self.completion


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str
    chosen: str
    rejected: str
    origin: str = ""

    @property
    def split_key(self) -> str:
        return self.prompt


@dataclass(frozen=True)
class LabelledExample(SFTExample):
    """One response judged alone (TRL's unpaired preference: prompt, completion, label), as KTO trains on:
    label True for a desirable response, False for an undesirable one."""
    label: bool = True


def unpaired(pairs: Iterable[PreferenceExample]) -> list[LabelledExample]:
    """Each pair as a desirable (chosen) and an undesirable (rejected) example (TRL's unpair_preference_dataset);
    both keep the pair's prompt, so a split keeps them together."""
    return [LabelledExample(p.prompt, response, p.origin, label=label)
            for p in pairs for response, label in ((p.chosen, True), (p.rejected, False))]


class DataFormat:
    """Base: subclasses implement the kinds of examples their data has."""

    #: responses are chat turns (they end with the template's end-of-turn token, not EOS)
    chat = False
    #: the data has turns a chat template can render (whether it does: `chat`)
    has_turns = False

    def __init__(self, cfg: DictConfig, tokenizer, cache_dir: str | Path | None = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.skipped: Counter[str] = Counter()  # bad rows dropped under data.on_bad_row=skip, by reason

    def bad(self, error: DataError) -> None:
        """A bad row: stop naming file and line (data.on_bad_row=error), or count it and go on (skip)."""
        if self.cfg.get("on_bad_row", "error") != "skip":
            raise error
        if not self.skipped:
            log.warning("skipping bad rows (data.on_bad_row=skip), the first: %s", error)
        self.skipped[error.reason] += 1

    def collect(self, records: Iterable[Record], make: Callable[[Record], T]) -> list[T]:
        """`make(record)` for each record; a DataError it raises is a bad row (see `bad`)."""
        out = []
        for rec in records:
            try:
                out.append(make(rec))
            except DataError as error:
                self.bad(error)
        return out

    def sft_examples(self) -> list[SFTExample]:
        raise ConfigError("data", f"data={self.cfg.name} has no SFT examples")

    def preference_examples(self) -> list[PreferenceExample]:
        raise ConfigError("data", f"data={self.cfg.name} has no preference pairs")

    def prompt_examples(self) -> list[SFTExample]:
        """Prompts to sample from (GRPO, PPO, eval), each with its reference response."""
        return self.sft_examples()

    def unpaired_examples(self) -> list[LabelledExample]:
        """Responses labelled desirable or not (KTO): the preference pairs, each split in two."""
        return unpaired(self.preference_examples())

    def chat_prompt(self, messages: list[dict], where: str) -> str:
        """Chat messages as a prompt: the template with the assistant's header; refused naming the key where
        there is no template (the tokenizer has none, or data.chat_template=none). `where`: what needs it."""
        if not uses_chat_template(self.cfg, self.tokenizer):
            raise ConfigError("data.chat_template", f"{where} is conversational and there is no chat template "
                              "(the tokenizer has none, or data.chat_template=none): set data.chat_template=chatml "
                              "(or a .jinja file)")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _hub_spec(self, kind: str):
        spec = (self.cfg.get("hub") or {}).get(kind)
        if spec is None:
            raise ConfigError(f"data.hub.{kind}", f"data={self.cfg.name} names no hub source for {kind} data")
        return spec

    def _file(self) -> str:
        if not self.cfg.get("path"):
            raise ConfigError("data.path", f"data.source=file needs data.path (data={self.cfg.name})")
        return self.cfg.path


def checked_sft(example: SFTExample, rec: Record) -> SFTExample:
    if not example.completion.strip():
        raise DataError(rec.path, "empty completion (nothing to learn)", rec.line, reason="empty response")
    return example


def checked_pair(pair: PreferenceExample, rec: Record) -> PreferenceExample:
    """A pair that teaches a preference: two non-empty responses that differ."""
    if not pair.chosen.strip() or not pair.rejected.strip():
        which = "chosen" if not pair.chosen.strip() else "rejected"
        raise DataError(rec.path, f"empty {which} response", rec.line, reason="empty response")
    if pair.chosen == pair.rejected:
        raise DataError(rec.path, "chosen and rejected are identical (no preference to learn)", rec.line,
                        reason="chosen == rejected")
    return pair


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
          "bot": "assistant", "model": "assistant"}


def to_message(turn: dict, rec: Record) -> dict:
    """A ShareGPT turn ({"from", "value"}) or a chat message ({"role", "content"}) as a chat message."""
    role = turn.get("from", turn.get("role"))
    content = turn.get("value", turn.get("content"))
    if role not in _ROLES or not isinstance(content, str):
        raise DataError(rec.path, f"turn {turn!r:.80} needs from/value or role/content", rec.line)
    return {"role": _ROLES[role], "content": content}


def uses_chat_template(cfg: DictConfig, tokenizer) -> bool:
    """Whether data with turns goes through a chat template: the tokenizer has one (or data.chat_template set
    it) and data.chat_template is not none."""
    return cfg.get("chat_template") != NO_TEMPLATE and bool(getattr(tokenizer, "chat_template", None))
