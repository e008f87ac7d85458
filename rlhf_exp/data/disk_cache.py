"""Data work kept between processes under `paths.cache_dir`: fitted TL;DR prompts, tokenized splits.

An entry's file name is a hash of everything that produced it (the tokenizer itself, the texts, the
caps, the code), so a change makes a new entry rather than a stale hit. Files are written into place
(a temporary file renamed), so parallel runs never read half of one; a broken file is ignored and the
work is done again; a cache that cannot be written costs time, never the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import weakref
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

_TOKENIZER_HASH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def digest(parts: Iterable[str | bytes]) -> str:
    """sha256 over `parts`, each length-prefixed (so ("ab", "c") and ("a", "bc") differ)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part  # bytes, or a buffer (memoryview)
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def tokenizer_hash(tokenizer) -> str | None:
    """The fast tokenizer's full definition, hashed (None for a slow tokenizer: no cheap fingerprint)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    if tokenizer not in _TOKENIZER_HASH:
        _TOKENIZER_HASH[tokenizer] = digest([backend.to_str()])
    return _TOKENIZER_HASH[tokenizer]


def read_json(path: Path | None) -> Any | None:
    """The entry at `path`, or None (absent, or broken: then it is warned about and made again)."""
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        log.warning("ignoring the cached %s (%s); doing that work again", path, error)
        return None


def write_json(path: Path | None, value: Any) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as out:
            json.dump(value, out)
        os.replace(out.name, path)
    except OSError as error:
        log.warning("could not keep %s in the cache (%s)", path, error)


def weights_hash(model) -> str:
    """sha256 over every parameter and buffer of `model` (names, dtypes, shapes and bytes): two models
    hash alike only if they compute alike. Streamed a tensor at a time: a 7B model is never copied to
    the host whole (14.5 GB for Mistral-7B). ~1 s per 500 MB of weights."""
    import torch

    def parts():
        for name, tensor in model.state_dict().items():
            tensor = tensor.detach()
            yield f"{name}:{tensor.dtype}:{tuple(tensor.shape)}"
            yield memoryview(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())

    return digest(parts())


def cached_rows(cache_dir: str | Path | None, kind: str, key_parts: Iterable[str | bytes], compute):
    """`compute()` -> a float tensor [N, ...], kept under `cache_dir/<kind>/` keyed by `key_parts`, so a
    later process that would compute the same rows (the next job of a sweep) reads them instead."""
    import torch

    path = None if cache_dir is None else Path(cache_dir) / kind / f"{digest(key_parts)[:32]}.json"
    kept = read_json(path)
    if isinstance(kept, dict) and {"dtype", "shape", "rows"} <= kept.keys():
        log.info("%s read from the cache (%s)", kind, path)
        return torch.tensor(kept["rows"], dtype=getattr(torch, kept["dtype"])).reshape(kept["shape"])
    rows = compute()
    write_json(path, {"dtype": str(rows.dtype).removeprefix("torch."), "shape": list(rows.shape),
                      "rows": rows.reshape(-1).tolist()})
    return rows
