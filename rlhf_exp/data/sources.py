"""Reading raw records: vendored files, local files, and the hub.

Every record remembers where it came from (file and line), so a malformed or incomplete
record is reported by file and line instead of failing somewhere downstream.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

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


GZIP_MAGIC = b"\x1f\x8b"
BadRow = Callable[[DataError], None]


def raise_it(error: DataError) -> None:
    raise error


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as head:
        return head.read(2) == GZIP_MAGIC


def _open_binary(path: Path):
    """The file's bytes, gunzipped when it is gzip whatever its name (a .jsonl that is really .gz)."""
    if not path.is_file():
        raise DataError(path, "file not found")
    return gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")


@contextmanager
def _reading(path: Path, line: Callable[[], int | None] = lambda: None):
    """Turn what a broken file raises while read (a truncated or corrupt gzip) into one DataError."""
    try:
        yield
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        at = line()
        raise DataError(path, f"truncated or corrupt gzip ({type(exc).__name__}: {exc or 'unexpected end'})"
                        + (f" after line {at}" if at else ""), reason="corrupt gzip") from None


def _open_text(path: Path):
    """Text (UTF-8, a leading BOM accepted) for readers that take a whole file (JSON arrays, CSV)."""
    handle = _open_binary(path)
    try:
        with _reading(path):
            raw = handle.read()
    finally:
        handle.close()
    try:
        return io.StringIO(raw.decode("utf-8-sig"), newline="")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(path, f"not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                        "re-encode the file as UTF-8", line, reason="invalid UTF-8") from None


def read_jsonl(path: str | Path, bad: BadRow = raise_it) -> Iterator[Record]:
    """JSON lines: one object per line, blank lines ignored. A bad line goes to `bad` (raise by default;
    data.on_bad_row=skip counts it and goes on)."""
    path = Path(path)
    line_no = 0
    with _open_binary(path) as handle, _reading(path, lambda: line_no):
        for line_no, raw in enumerate(handle, start=1):
            if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                line = raw.decode("utf-8").rstrip("\r\n")  # the newline is not part of the JSON (error columns)
            except UnicodeDecodeError as exc:
                bad(DataError(path, f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})", line_no,
                              reason="invalid UTF-8"))
                continue
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                bad(DataError(path, f"invalid JSON ({exc.msg} at column {exc.colno})", line_no, reason="invalid JSON"))
                continue
            if not isinstance(data, dict):
                bad(DataError(path, f"expected a JSON object, got {type(data).__name__}", line_no,
                              reason="not a JSON object"))
                continue
            yield Record(data, str(path), line_no)


def read_json_or_jsonl(path: str | Path, bad: BadRow = raise_it) -> Iterator[Record]:
    """A JSON array of objects (record index as `line`) or, by extension, JSON lines."""
    path = Path(path)
    if ".jsonl" in path.suffixes:
        yield from read_jsonl(path, bad)
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
            bad(DataError(path, f"item {index} is a {type(item).__name__}, expected an object",
                          reason="not a JSON object"))
            continue
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
