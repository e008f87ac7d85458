"""data=hh_rlhf: Anthropic's HH-RLHF dialogues, as chat messages through a template or as the plain
"\n\nHuman: ... \n\nAssistant:" text the seeds fed base models."""

from __future__ import annotations

import re
from typing import Iterator

from rlhf_exp.data.formats.base import DataFormat, PreferenceExample, SFTExample, uses_chat_template
from rlhf_exp.data.sources import Record, read_hub, read_jsonl, vendored
from rlhf_exp.errors import ConfigError, DataError

ASSISTANT_TAG = "\n\nAssistant:"


_TURN = re.compile(r"\n\n(Human|Assistant):")


def dialogue_messages(prompt: str) -> list[dict]:
    """An HH-RLHF prompt ("\n\nHuman: ...\n\nAssistant: ...\n\nAssistant:") as chat messages, without the
    empty assistant turn it ends with."""
    parts = _TURN.split(prompt)  # [before, role, text, role, text, ...]
    turns = [{"role": "user" if role == "Human" else "assistant", "content": text.strip()}
             for role, text in zip(parts[1::2], parts[2::2])]
    if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns = turns[:-1]
    return turns


def split_dialogue(text: str) -> tuple[str, str] | None:
    """HH-RLHF dialogue -> (prompt up to and including the last "\\n\\nAssistant:", the reply)."""
    cut = text.rfind(ASSISTANT_TAG)
    if cut < 0:
        return None
    cut += len(ASSISTANT_TAG)
    return text[:cut], text[cut:]


class HhRlhfFormat(DataFormat):
    """HH-RLHF dialogues as chat messages through the tokenizer's chat template (the responses then end with its
    end of turn), as every format with turns is; the plain "\n\nHuman: ... \n\nAssistant:" text with
    data.chat_template=none or a tokenizer without a template (a base model, as the seeds' Pythia)."""

    has_turns = True

    @property
    def chat(self) -> bool:
        return uses_chat_template(self.cfg, self.tokenizer)

    def _records(self) -> Iterator[Record]:
        if self.cfg.source == "vendored":
            for subset in self.cfg.subsets:
                path = vendored(f"hh-rlhf/{subset}.test.jsonl.gz")
                if not path.is_file():
                    raise ConfigError("data.subsets", f"unknown subset {subset!r} (no {path.name})")
                yield from read_jsonl(path, self.bad)
        elif self.cfg.source == "hub":
            yield from read_hub(self._hub_spec("preference"), "data.hub.preference")
        elif self.cfg.source == "file":
            yield from read_jsonl(self._file(), self.bad)
        else:
            raise ConfigError("data.source", f"unknown source {self.cfg.source!r}")

    def preference_examples(self) -> list[PreferenceExample]:
        out = []
        for rec in self._records():
            chosen, rejected = split_dialogue(rec.get("chosen")), split_dialogue(rec.get("rejected"))
            if chosen is None or rejected is None:
                raise DataError(rec.path, "dialogue has no '\\n\\nAssistant:' turn", rec.line)
            if chosen[0] != rejected[0] or chosen[1] == rejected[1]:
                continue  # differing prompts or identical replies carry no preference
            if self.chat:
                prompt = self.chat_prompt(dialogue_messages(chosen[0]), rec.origin)
                out.append(PreferenceExample(prompt, chosen[1].strip(), rejected[1].strip(), rec.origin))
            else:
                out.append(PreferenceExample(chosen[0], chosen[1], rejected[1], rec.origin))
        return out

    def sft_examples(self) -> list[SFTExample]:
        return [SFTExample(p.prompt, p.chosen, p.origin) for p in self.preference_examples()]
