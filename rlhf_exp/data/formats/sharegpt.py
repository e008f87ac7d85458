"""data=sharegpt: ShareGPT conversations ({"from", "value"} turns), each assistant turn a response."""

from __future__ import annotations

from typing import Iterator

from rlhf_exp.data.formats.base import DataFormat, PreferenceExample, SFTExample, checked_pair, checked_sft, to_message
from rlhf_exp.data.sources import Record, read_hub, read_json_or_jsonl, vendored
from rlhf_exp.errors import ConfigError, DataError


class ShareGptFormat(DataFormat):
    chat = True
    has_turns = True

    def _records(self) -> Iterator[Record]:
        if self.cfg.source == "vendored":
            return read_json_or_jsonl(vendored("sharegpt-demo/dpo_en_demo.json.gz"), self.bad)
        if self.cfg.source == "hub":
            return read_hub(self._hub_spec("preference"), "data.hub.preference")
        if self.cfg.source == "file":
            return read_json_or_jsonl(self._file(), self.bad)
        raise ConfigError("data.source", f"unknown source {self.cfg.source!r}")

    def _conversation(self, rec: Record) -> list[dict]:
        turns = rec.data.get("conversations", rec.data.get("messages"))
        if not isinstance(turns, list) or not turns:
            raise DataError(rec.path, "needs a non-empty 'conversations' (or 'messages') list", rec.line)
        return [to_message(t, rec) for t in turns]

    def _prompt(self, messages: list[dict]) -> str:
        return self.chat_prompt(messages, f"data={self.cfg.name}")

    def _sft_example(self, rec: Record) -> SFTExample:
        messages = self._conversation(rec)
        if "chosen" in rec.data:
            reply = to_message(rec.data["chosen"], rec)["content"]
        elif messages[-1]["role"] == "assistant":
            messages, reply = messages[:-1], messages[-1]["content"]
        else:
            raise DataError(rec.path, "no assistant reply: the last turn is not the assistant's and there is no "
                            "'chosen'", rec.line, reason="no assistant reply")
        return checked_sft(SFTExample(self._prompt(messages), reply, rec.origin), rec)

    def _pair(self, rec: Record) -> PreferenceExample:
        prompt = self._prompt(self._conversation(rec))
        chosen = to_message(rec.get("chosen"), rec)["content"]
        rejected = to_message(rec.get("rejected"), rec)["content"]
        return checked_pair(PreferenceExample(prompt, chosen, rejected, rec.origin), rec)

    def sft_examples(self) -> list[SFTExample]:
        return self.collect(self._records(), self._sft_example)

    def preference_examples(self) -> list[PreferenceExample]:
        return self.collect(self._records(), self._pair)
