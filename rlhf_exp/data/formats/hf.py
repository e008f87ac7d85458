"""Any Hugging Face data set, hub or local, in TRL's dataset types (data=hub, data=file).

TRL's types (huggingface.co/docs/trl/dataset_formats), each in a standard style (strings) or a
conversational one (lists of {"role", "content"} messages):

  language_modeling   text | messages                 SFT
  prompt_only         prompt                          GRPO, PPO
  prompt_completion   prompt, completion              SFT (and prompts for GRPO, PPO)
  preference          [prompt,] chosen, rejected      RM, DPO (SFT on chosen; prompts for GRPO, PPO; KTO, each
                                                      pair split into a desirable and an undesirable example)
  unpaired_preference prompt, completion, label       KTO (label true: desirable)

The type is detected from the columns (after `data.columns` maps the data set's names onto these) or set
by `data.format`; a preference without a prompt column has an implicit prompt, the longest common prefix
of chosen and rejected (TRL's extract_prompt). A conversational prompt goes through the tokenizer's chat
template with the generation prompt; a conversational response is the assistant turn's text, which the
tokenizing step ends with the template's end-of-turn token.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig

from rlhf_exp.data.formats.base import (DataFormat, Document, LabelledExample, PreferenceExample, SFTExample,
                                        checked_pair, checked_sft, to_message)
from rlhf_exp.data.sources import Record, read_csv, read_json_or_jsonl, read_jsonl
from rlhf_exp.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TYPES = ("language_modeling", "prompt_only", "prompt_completion", "preference", "unpaired_preference")
COLUMNS = ("text", "messages", "prompt", "completion", "chosen", "rejected", "label")
# what each stage's kind of examples can be made from
_MAKES = {"sft": ("language_modeling", "prompt_completion", "preference"),
          "preference": ("preference",),
          "prompt": ("prompt_only", "prompt_completion", "preference", "language_modeling", "unpaired_preference"),
          "unpaired": ("unpaired_preference", "preference")}


def source_label(cfg: DictConfig) -> str:
    """How messages name a data=hub / data=file set: the source itself."""
    return f"{cfg.source}:{cfg.get('path')}" + (f" ({cfg.name})" if cfg.get("name") else "")


# --------------------------------------------------------------------------- reading


def is_saved_dataset(path: Path) -> bool:
    """A folder written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))


def _dataset_rows(dataset, label: str, limit: int | None) -> Iterator[Record]:
    for index, row in enumerate(dataset):
        if limit is not None and index >= limit:
            return
        yield Record(dict(row), f"{label} [row {index}]")


def _pick_split(dataset, cfg: DictConfig, label: str):
    """A DatasetDict's `data.split` (a Dataset is taken whole)."""
    if hasattr(dataset, "keys"):
        if cfg.split not in dataset:
            raise ConfigError("data.split", f"{label} has splits {sorted(dataset)}, not {cfg.split!r}")
        return dataset[cfg.split]
    return dataset


def read_file(cfg: DictConfig, bad) -> Iterator[Record]:
    """Rows of a local file (JSON lines, JSON array, CSV: read here, so an error names the line; Parquet
    and save_to_disk folders: through `datasets`)."""
    if not cfg.get("path"):
        raise ConfigError("data.path", "data=file needs data.path=<a .jsonl / .json / .csv / .parquet file, "
                          "or a folder written by datasets' save_to_disk>")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise ConfigError("data.path", f"{path} does not exist")
    suffixes = [s.lower() for s in path.suffixes]
    limit = cfg.get("max_rows")
    if is_saved_dataset(path):
        import datasets

        rows = _dataset_rows(_pick_split(datasets.load_from_disk(str(path)), cfg, str(path)), str(path), limit)
    elif ".parquet" in suffixes:
        import datasets

        rows = _dataset_rows(datasets.load_dataset("parquet", data_files=str(path), split="train"), str(path), limit)
    elif ".jsonl" in suffixes:
        rows = read_jsonl(path, bad)
    elif ".json" in suffixes:
        rows = read_json_or_jsonl(path, bad)
    elif ".csv" in suffixes:
        rows = read_csv(path)
    elif path.is_dir():
        raise ConfigError("data.path", f"{path} is a folder but not one datasets' save_to_disk wrote "
                          "(no state.json or dataset_dict.json)")
    else:
        raise ConfigError("data.path", f"{path}: not a file type data=file reads (.jsonl, .json, .csv, .parquet, "
                          "optionally .gz for the text ones) nor a save_to_disk folder")
    for index, record in enumerate(rows):
        if limit is not None and index >= limit:
            return
        yield record


def read_hub_dataset(cfg: DictConfig) -> Iterator[Record]:
    """Rows of `data.path` on the hub (`data.name`, `data.split`; `data.streaming` reads as it goes)."""
    import datasets

    if not cfg.get("path"):
        raise ConfigError("data.path", "data=hub needs data.path=<a hub data set id, e.g. trl-lib/ultrafeedback_binarized>")
    try:
        dataset = datasets.load_dataset(cfg.path, cfg.get("name"), split=cfg.split, streaming=bool(cfg.streaming))
    except Exception as exc:  # ConnectionError, DatasetNotFoundError, ValueError for a bad split, ...
        raise ConfigError("data.path", f"could not load hub data set {cfg.path!r}"
                          + (f" (data.name={cfg.name})" if cfg.get("name") else "") + f", split {cfg.split!r}: "
                          f"{type(exc).__name__}: {str(exc)[:300]}. Offline, save it where you are online "
                          "(save_to_disk) and use data=file data.path=<that folder>") from exc
    yield from _dataset_rows(dataset, f"hub:{cfg.path}", cfg.get("max_rows"))


# --------------------------------------------------------------------------- TRL types


def is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(turn, dict) for turn in value)


def extract_prompt(chosen, rejected):
    """(prompt, chosen, rejected) of a preference with an implicit prompt: the longest common prefix (of
    messages, or of characters backed off a trailing space), as TRL's extract_prompt."""
    index = 0
    for index in range(min(len(chosen), len(rejected))):
        if chosen[index] != rejected[index]:
            if isinstance(chosen, str) and index and chosen[index - 1] == " ":
                index -= 1
            break
    else:
        index = min(len(chosen), len(rejected))
    return chosen[:index], chosen[index:], rejected[index:]


_ROWS: dict[tuple, tuple[list[Record], Any]] = {}  # the last sources read, with the bad rows they skipped


def _source_key(cfg: DictConfig) -> tuple:
    path = Path(str(cfg.get("path"))).expanduser()
    stamp = (path.stat().st_mtime_ns, path.stat().st_size) if cfg.source == "file" and path.is_file() else None
    return (cfg.source, str(path), stamp, cfg.get("name"), cfg.get("split"), cfg.get("max_rows"), cfg.get("on_bad_row"))


class HfFormat(DataFormat):
    """data=hub / data=file: TRL's dataset types in either style (see the module docstring)."""

    forced_type: str | None = None  # data.format=<type> sets it; data.format=trl detects it
    has_turns = True

    def __init__(self, cfg: DictConfig, tokenizer, cache_dir: str | Path | None = None):
        super().__init__(cfg, tokenizer, cache_dir)
        self.columns = {name: (cfg.get("columns") or {}).get(name) or name for name in COLUMNS}
        self._rows: list[Record] | None = None

    # reading and detecting -----------------------------------------------------------------

    def records(self) -> list[Record]:
        """The rows, read once per process and source (a run asks for the split, the chat style, the prompts)."""
        if self._rows is None:
            key = _source_key(self.cfg)
            if key in _ROWS:
                self._rows, skipped = _ROWS[key]
                self.skipped.update(skipped)
                return self._rows
            if self.cfg.source == "hub":
                rows = list(read_hub_dataset(self.cfg))
            elif self.cfg.source == "file":
                rows = list(read_file(self.cfg, self.bad))
            else:
                raise ConfigError("data.source", f"{source_label(self.cfg)}: data=hub and data=file read "
                                  f"source=hub or source=file, not {self.cfg.source!r}")
            if not rows:
                raise ConfigError("data.path", f"{source_label(self.cfg)} has no rows")
            while len(_ROWS) >= 2:
                _ROWS.pop(next(iter(_ROWS)))
            _ROWS[key] = (rows, self.skipped.copy())
            self._rows = rows
            log.info("%s: %d rows, TRL's %s type%s", source_label(self.cfg), len(rows), self.dataset_type,
                     " (conversational)" if self.conversational else "")
        return self._rows

    def _present(self) -> set[str]:
        """The TRL columns the first row has, after data.columns; a column mapped explicitly must exist."""
        first = self.records()[0]
        for name, column in (self.cfg.get("columns") or {}).items():
            if column and column not in first.data:
                raise ConfigError(f"data.columns.{name}", f"{first.path.split(' [')[0]} has no column {column!r} "
                                  f"(its columns: {sorted(first.data)})")
        return {name for name in COLUMNS if first.data.get(self.columns[name]) is not None}

    @property
    def dataset_type(self) -> str:
        forced = self.forced_type or self.cfg.get("type")
        if forced:
            return forced
        present = self._present()
        if {"chosen", "rejected"} <= present:
            return "preference"
        if {"prompt", "completion", "label"} <= present:
            return "unpaired_preference"
        if {"prompt", "completion"} <= present:
            return "prompt_completion"
        if "prompt" in present:
            return "prompt_only"
        if present & {"text", "messages"}:
            return "language_modeling"
        first = self.records()[0]
        raise ConfigError("data.columns", f"{source_label(self.cfg)}: columns {sorted(first.data)} are none of TRL's "
                          "types (text | messages; prompt; prompt + completion; [prompt +] chosen + rejected; prompt + "
                          "completion + label): map yours with "
                          "data.columns.<prompt|completion|chosen|rejected|label|messages|text>=<column>")

    @property
    def conversational(self) -> bool:
        first = self.records()[0]
        return any(is_conversation(first.data.get(self.columns[name])) for name in ("messages", "prompt", "chosen"))

    @property
    def chat(self) -> bool:  # responses end with the template's end of turn
        return self.conversational

    # values -------------------------------------------------------------------------------

    def _value(self, rec: Record, name: str):
        value = rec.get(self.columns[name], hint=f"data.columns.{name}")
        if not isinstance(value, str) and not is_conversation(value):
            raise DataError(rec.path, f"column {self.columns[name]!r} must be a string or a list of messages, "
                            f"got {type(value).__name__}", rec.line)
        return value

    def _messages(self, turns, rec: Record) -> list[dict]:
        return [to_message(turn, rec) for turn in turns]

    def _prompt_text(self, prompt, rec: Record) -> str:
        """A standard prompt as it is; a conversational one through the chat template, generation prompt on."""
        if isinstance(prompt, str):
            return prompt
        return self.chat_prompt(self._messages(prompt, rec), rec.origin)

    def _response_text(self, response, rec: Record, name: str) -> str:
        """A standard response as it is; a conversational one is its single assistant turn's content."""
        if isinstance(response, str):
            return response
        turns = self._messages(response, rec)
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise DataError(rec.path if rec.line is None else rec.path, f"column {self.columns[name]!r} must hold one "
                            f"assistant message, got roles {[t['role'] for t in turns]}", rec.line,
                            reason="not one assistant turn")
        return turns[0]["content"]

    def _conversation_split(self, rec: Record) -> tuple[str, str]:
        """A language-modelling conversation: (the turns before the last assistant reply, templated; the reply)."""
        turns = self._messages(self._value(rec, "messages"), rec)
        if turns[-1]["role"] != "assistant":
            raise DataError(rec.path, "the conversation does not end with an assistant turn", rec.line,
                            reason="no assistant reply")
        return self._prompt_text(turns[:-1], rec), turns[-1]["content"]

    def _pair(self, rec: Record) -> tuple[Any, Any, Any]:
        chosen, rejected = self._value(rec, "chosen"), self._value(rec, "rejected")
        if type(chosen) is not type(rejected):
            raise DataError(rec.path, "chosen and rejected must both be strings or both be message lists", rec.line)
        if rec.data.get(self.columns["prompt"]) is not None:
            return self._value(rec, "prompt"), chosen, rejected
        prompt, chosen, rejected = extract_prompt(chosen, rejected)  # implicit prompt
        if not prompt:
            raise DataError(rec.path, "chosen and rejected share no prompt (implicit-prompt preference) and there is "
                            f"no {self.columns['prompt']!r} column (data.columns.prompt)", rec.line,
                            reason="no common prompt")
        return prompt, chosen, rejected

    # examples -----------------------------------------------------------------------------

    def _refuse(self, kind: str, needed: str):
        raise ConfigError("data.format", f"{source_label(self.cfg)} is a {self.dataset_type} data set, which has no "
                          f"{kind}: {needed}")

    def _sft_example(self, rec: Record) -> SFTExample:
        kind = self.dataset_type
        if kind == "language_modeling":
            if rec.data.get(self.columns["messages"]) is not None:
                prompt, completion = self._conversation_split(rec)
            else:
                # a document to model whole: the start-of-document token is the prompt the first token follows
                start = self.tokenizer.bos_token or self.tokenizer.eos_token
                return checked_sft(Document(start, self._value(rec, "text"), rec.origin), rec)
        elif kind in ("prompt_completion", "unpaired_preference"):
            prompt = self._prompt_text(self._value(rec, "prompt"), rec)
            completion = self._response_text(self._value(rec, "completion"), rec, "completion")
        else:
            raw_prompt, chosen, _ = self._pair(rec)
            prompt, completion = self._prompt_text(raw_prompt, rec), self._response_text(chosen, rec, "chosen")
        return checked_sft(SFTExample(prompt, completion, rec.origin), rec)

    def _preference(self, rec: Record) -> PreferenceExample:
        prompt, chosen, rejected = self._pair(rec)
        return checked_pair(PreferenceExample(self._prompt_text(prompt, rec), self._response_text(chosen, rec, "chosen"),
                                              self._response_text(rejected, rec, "rejected"), rec.origin), rec)

    def _reward_row(self, rec: Record) -> dict:
        """What reward functions get of the row, as TRL passes it: every column but the prompt and completion by
        its own name, and a conversational prompt's messages under "prompt"."""
        used = {self.columns["prompt"], self.columns["completion"]}
        row = {name: value for name, value in rec.data.items() if name not in used}
        prompt = rec.data.get(self.columns["prompt"])
        if is_conversation(prompt):
            row["prompt"] = self._messages(prompt, rec)
        return row

    def _prompt_example(self, rec: Record) -> SFTExample:
        """A prompt to sample from, with its reference response where the data set has one ("" otherwise), and
        the row's columns for reward functions."""
        kind = self.dataset_type
        if kind == "prompt_only":
            example = SFTExample(self._prompt_text(self._value(rec, "prompt"), rec), "", rec.origin)
        else:
            example = self._sft_example(rec)
        return replace(example, row=self._reward_row(rec))

    def sft_examples(self) -> list[SFTExample]:
        if self.dataset_type not in _MAKES["sft"]:
            self._refuse("completions to fine-tune on", "SFT needs text, messages, prompt + completion or chosen")
        return self.collect(self.records(), self._sft_example)

    def preference_examples(self) -> list[PreferenceExample]:
        if self.dataset_type not in _MAKES["preference"]:
            self._refuse("preference pairs", "RM and DPO need chosen and rejected columns")
        return self.collect(self.records(), self._preference)

    def unpaired_examples(self) -> list[LabelledExample]:
        if self.dataset_type not in _MAKES["unpaired"]:
            self._refuse("labelled responses", "KTO needs prompt + completion + label, or preference pairs")
        if self.dataset_type == "preference":
            return super().unpaired_examples()
        return self.collect(self.records(), self._labelled)

    def _labelled(self, rec: Record) -> LabelledExample:
        example = checked_sft(self._sft_example(rec), rec)
        label = rec.get(self.columns["label"], hint="data.columns.label")
        if not isinstance(label, bool):
            raise DataError(rec.path, f"column {self.columns['label']!r} must be true or false, got {label!r:.40}",
                            rec.line, reason="label not a boolean")
        return LabelledExample(example.prompt, example.completion, example.origin, label=label)

    def prompt_examples(self) -> list[SFTExample]:
        if self.dataset_type == "language_modeling" and self.records()[0].data.get(self.columns["messages"]) is None:
            self._refuse("prompts", "GRPO and PPO need a prompt column (or conversations, whose last reply is cut)")
        return self.collect(self.records(), self._prompt_example)


def typed_format(kind: str) -> type[HfFormat]:
    """HfFormat with its TRL type set (data.format=<type>) rather than detected (data.format=trl)."""
    return type(f"HfFormat_{kind}", (HfFormat,), {"forced_type": kind})
