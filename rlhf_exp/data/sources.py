"""Reading raw records: vendored files, local files, and the hub.

Every record remembers where it came from (file and line), so a malformed or incomplete
record is reported by file and line instead of failing somewhere downstream.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rlhf_exp.errors import ConfigError, DataError

VENDORED_DIR = Path(__file__).resolve().parent / "vendored"


@dataclass(frozen=True)
class Record:
    data: dict[str, Any]
    path: str
    line: int | None = None  # 1-based line in a JSON-lines/CSV file; index in a JSON array

    @property
    def origin(self) -> str:
        return f"{self.path}:{self.line}" if self.line is not None else self.path

    def get(self, field: str, hint: str | None = None) -> Any:
        """The field's value; a clear error naming file, line and the config key to change."""
        if field not in self.data or self.data[field] is None:
            fix = f" (the field name is set by `{hint}`)" if hint else ""
            raise DataError(self.path, f"missing field {field!r}{fix}; fields present: {sorted(self.data)}", self.line)
        return self.data[field]


def vendored(relative: str) -> Path:
    return VENDORED_DIR / relative


def _open_text(path: Path):
    if not path.is_file():
        raise DataError(path, "file not found")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(path: str | Path) -> Iterator[Record]:
    path = Path(path)
    with _open_text(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(path, f"invalid JSON ({exc.msg} at column {exc.colno})", line_no) from None
            if not isinstance(data, dict):
                raise DataError(path, f"expected a JSON object, got {type(data).__name__}", line_no)
            yield Record(data, str(path), line_no)


def read_json_or_jsonl(path: str | Path) -> Iterator[Record]:
    """A JSON array of objects (record index as `line`) or, by extension, JSON lines."""
    path = Path(path)
    if ".jsonl" in path.suffixes:
        yield from read_jsonl(path)
        return
    with _open_text(path) as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as exc:
            raise DataError(path, f"invalid JSON ({exc.msg})", exc.lineno) from None
    if not isinstance(data, list):
        raise DataError(path, "expected a JSON array of objects (or a .jsonl file)")
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(path, f"item {index} is a {type(item).__name__}, expected an object")
        yield Record(item, f"{path} [item {index}]")


def read_csv(path: str | Path) -> Iterator[Record]:
    path = Path(path)
    with _open_text(path) as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            yield Record(row, str(path), reader.line_num)


def read_hub(spec: Any, key: str) -> Iterator[Record]:
    """Rows of a hub data set (`spec`: path, name, split). Needs a network or a warm HF cache."""
    import datasets

    try:
        rows = datasets.load_dataset(spec["path"], spec.get("name"), split=spec.get("split", "train"))
    except Exception as exc:  # ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
        raise ConfigError(
            key, f"could not load hub data set {spec['path']!r} ({exc.__class__.__name__}). "
            "Offline, use data.source=vendored or data=jsonl data.path=/your/file.jsonl") from exc
    label = f"hub:{spec['path']}"
    for index, row in enumerate(rows):
        yield Record(dict(row), label, index)
