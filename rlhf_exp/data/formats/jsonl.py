"""data=jsonl: prompt / completion / chosen / rejected fields of a JSON lines file, named by data.fields."""

from __future__ import annotations

from typing import Iterator

from rlhf_exp.data.formats.base import DataFormat, PreferenceExample, SFTExample, checked_pair, checked_sft
from rlhf_exp.data.sources import Record, read_jsonl, vendored
from rlhf_exp.errors import ConfigError, DataError


class JsonlFormat(DataFormat):
    DEFAULT_FILE = "examples/hh_pairs_sample.jsonl"

    def _records(self) -> Iterator[Record]:
        if self.cfg.source == "hub":  # it used to read the vendored sample instead
            raise ConfigError("data.source", "data=jsonl reads a local file (data.path); for a hub data set use "
                              "data=hub data.path=<hub id> [data.name=... data.split=... data.columns.<x>=...]")
        return read_jsonl(self.cfg.get("path") or vendored(self.DEFAULT_FILE), self.bad)

    def _field(self, rec: Record, name: str) -> str:
        field = self.cfg.fields[name]
        value = rec.get(field, hint=f"data.fields.{name}")
        if not isinstance(value, str):
            raise DataError(rec.path, f"field {field!r} must be a string, got {type(value).__name__}", rec.line)
        return value

    def sft_examples(self) -> list[SFTExample]:
        return self.collect(self._records(), lambda r: checked_sft(
            SFTExample(self._field(r, "prompt"), self._field(r, "completion"), r.origin), r))

    def preference_examples(self) -> list[PreferenceExample]:
        return self.collect(self._records(), lambda r: checked_pair(
            PreferenceExample(self._field(r, "prompt"), self._field(r, "chosen"), self._field(r, "rejected"), r.origin), r))
