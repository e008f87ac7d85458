"""Bad data files (issue 11): each case stops with file and line (data.on_bad_row=error) or is dropped and
counted (skip), never a traceback; a UTF-8 BOM and a gzip file named .jsonl are read as they are.
Property-based tests throw generated records and bytes at the readers and collators."""

from __future__ import annotations

import codecs
import copy
import functools
import gzip
import json
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from rlhf_exp.launch.run import resolved
from rlhf_exp.config import compose_config
from rlhf_exp.data import load_sft_splits
from rlhf_exp.data.collate import collate_pairs, collate_sft, tokenize_pair, tokenize_sft
from rlhf_exp.data.formats import PreferenceExample, SFTExample
from rlhf_exp.data.formats import get_format
from rlhf_exp.data.sources import read_jsonl
from rlhf_exp.errors import DataError

GOOD = {"prompt": "Q: 2+2?", "completion": " 4", "chosen": " 4", "rejected": " 5"}


@functools.lru_cache(maxsize=None)
def _jsonl_data_cfg():
    return resolved(compose_config(["model=tiny", "data=jsonl"])).data


def data_cfg(*overrides: str):
    """data=jsonl with `key=value` overrides (composed once: property tests build hundreds)."""
    cfg = copy.deepcopy(_jsonl_data_cfg())
    for override in overrides:
        key, value = override.split("=", 1)
        OmegaConf.update(cfg, key.removeprefix("data."), int(value) if value.isdigit() else value)
    return cfg


def line(**fields) -> bytes:
    return (json.dumps({**GOOD, **fields}) + "\n").encode()


# (name, file name, bytes, kind, the error's text under on_bad_row=error (None: read fine), skip reason)
CORPUS = [
    ("invalid UTF-8", "bad.jsonl", line() + b'{"prompt": "caf\xe9", "completion": " x"}\n' + line(), "sft",
     r"bad\.jsonl, line 2: not UTF-8 \(byte 0xe9 at column 16\)", "invalid UTF-8"),
    ("truncated .gz", "cut.jsonl.gz", gzip.compress(line() * 200)[:-40], "sft",
     r"cut\.jsonl\.gz: truncated or corrupt gzip \(EOFError", None),
    ("gzip named .jsonl", "packed.jsonl", gzip.compress(line() * 3), "sft", None, None),
    ("UTF-8 BOM", "bom.jsonl", codecs.BOM_UTF8 + line() * 3, "sft", None, None),
    ("JSON error column", "col.jsonl", line() + b'{"prompt": "a", "completion": }\n', "sft",
     r"col\.jsonl, line 2: invalid JSON \(Expecting value at column 31\)", "invalid JSON"),
    ("chosen == rejected", "same.jsonl", line() + line(chosen=" 4", rejected=" 4"), "preference",
     r"same\.jsonl, line 2: chosen and rejected are identical", "chosen == rejected"),
    ("empty chosen", "empty.jsonl", line() + line(chosen="  "), "preference",
     r"empty\.jsonl, line 2: empty chosen response", "empty response"),
    ("empty completion", "empty_sft.jsonl", line() + line(completion=""), "sft",
     r"empty_sft\.jsonl, line 2: empty completion", "empty response"),
    ("not an object", "list.jsonl", line() + b"[1, 2]\n", "sft",
     r"list\.jsonl, line 2: expected a JSON object, got list", "not a JSON object"),
    ("missing field", "field.jsonl", line() + b'{"prompt": "a"}\n', "sft",
     r"field\.jsonl, line 2: missing field 'completion'", "missing field 'completion'"),
]


def examples(path, kind: str, *overrides: str):
    data = get_format(data_cfg(f"data.path={path}", *overrides), None)
    return data, (data.sft_examples() if kind == "sft" else data.preference_examples())


@pytest.mark.parametrize(("name", "file", "content", "kind", "error", "reason"), CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_data_corpus(tmp_path, name, file, content, kind, error, reason):
    path = tmp_path / file
    path.write_bytes(content)
    if error is None:
        _, got = examples(path, kind)
        assert len(got) == 3 and got[0].prompt == GOOD["prompt"]  # (the BOM is not part of the first field)
        return
    with pytest.raises(DataError, match=error):
        examples(path, kind)
    if reason is None:  # a broken file cannot be read on past the break: skip still stops
        with pytest.raises(DataError, match=error):
            examples(path, kind, "data.on_bad_row=skip")
        return
    data, kept = examples(path, kind, "data.on_bad_row=skip")
    assert data.skipped == Counter({reason: 1})
    assert [ex.origin for ex in kept] == [f"{path}:1", f"{path}:3"][: len(kept)] and len(kept) >= 1


def test_skipped_rows_are_counted_in_the_run(tmp_path):
    """The counts reach the run: the console and MLflow (tags data.skipped.<reason>, metric data/skipped_rows)."""
    from helpers import mlflow_runs, tiny_config
    from rlhf_exp.launch.run import run

    path = tmp_path / "mixed.jsonl"
    rows = [line(prompt=f"Q{i}?", completion=f" A{i}") for i in range(40)]
    rows[5], rows[9], rows[11] = b"{oops\n", line(completion=""), line(completion="   ")
    path.write_bytes(b"".join(rows))
    run(tiny_config(tmp_path, "data=jsonl", f"data.path={path}", "data.val_size=4", "data.on_bad_row=skip",
                    "stage.max_steps=1", "stage.num_samples=0"))
    client, [finished] = mlflow_runs(tmp_path / "mlflow.db")
    assert finished.data.tags["data.skipped.invalid_JSON"] == "1"
    assert finished.data.tags["data.skipped.empty_response"] == "2"
    assert finished.data.metrics["data/skipped_rows"] == 3
    assert finished.data.tags["data.num_train"] == str(40 - 3 - 4)


# ------------------------------------------------------------------ property-based

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_any_bytes_give_records_or_one_data_error(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("bytes") / "any.jsonl"
    path.write_bytes(content)
    try:
        records = list(read_jsonl(path))
    except DataError as error:
        assert str(path) in str(error)
        return
    assert all(isinstance(r.data, dict) for r in records)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.dictionaries(st.sampled_from(["prompt", "completion", "chosen", "rejected", "x"]), json_values,
                                max_size=5), min_size=1, max_size=6))
def test_any_json_records_give_examples_or_one_data_error(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("records") / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for kind in ("sft", "preference"):
        try:
            _, got = examples(path, kind)
        except DataError as error:
            assert ", line " in str(error)
            continue
        for ex in got:
            assert ex.prompt is not None
        skipped_data, kept = examples(path, kind, "data.on_bad_row=skip")
        assert len(kept) == len(got) and not skipped_data.skipped


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.text(max_size=40), st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40)),
                min_size=1, max_size=4))
def test_collators_take_any_text(tokenizer, rows):
    """Whatever the text (empty prompts, control characters, emoji), tokenizing and padding keep shapes and masks."""
    sft = [tokenize_sft(SFTExample(p, c), tokenizer, max_prompt_tokens=16, max_response_tokens=8, end_id=0)
           for p, c, _ in rows]
    batch = collate_sft(sft, pad_token_id=0)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["response_mask"].shape
    assert batch["input_ids"].shape[0] == len(rows)
    assert (batch["response_mask"] <= batch["attention_mask"]).all()  # a response token is never padding
    assert (batch["response_mask"].sum(-1) >= 1).all()
    pairs = [tokenize_pair(PreferenceExample(p, c, r), tokenizer, max_prompt_tokens=16, max_response_tokens=8,
                           end_id=0) for p, c, r in rows]
    paired = collate_pairs(pairs, pad_token_id=0)
    assert paired["input_ids"].shape[0] == 2 * len(rows)
    assert (paired["response_mask"].sum(-1) >= 1).all()  # every response keeps at least its end token


def test_load_counts_skips_for_the_caller(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"".join(line(prompt=f"Q{i}", completion=f" A{i}") for i in range(10)) + b"not json\n")
    skipped = Counter()
    train, val = load_sft_splits(data_cfg(f"data.path={path}", "data.val_size=2", "data.on_bad_row=skip"), None, 0,
                                 skipped)
    assert len(train) + len(val) == 10 and skipped == Counter({"invalid JSON": 1})
