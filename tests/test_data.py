"""Vendored data: counts, prompt formats, TL;DR truncation, honest splits, bad files."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from rlhf_exp.launch.run import resolved
from rlhf_exp.config import compose_config
from rlhf_exp.data import load_preference_splits, load_sft_splits
from rlhf_exp.data.formats.hh_rlhf import split_dialogue
from rlhf_exp.data.formats.tldr import TLDR_TEMPLATE, tldr_prompt
from rlhf_exp.data.formats import get_format
from rlhf_exp.data.splits import split_by_prompt
from rlhf_exp.errors import ConfigError, DataError

TLDR_PROMPT = re.compile(r"^SUBREDDIT: r/[^\n]+\n\nTITLE: [^\n]*\n\nPOST: .*\n\nTL;DR:$", re.S)


def data_cfg(name: str, *overrides: str):
    return resolved(compose_config(["model=tiny", f"data={name}", *overrides])).data


def test_tldr_vendored_sft_counts_and_format(tokenizer):
    cfg = data_cfg("tldr")
    examples = get_format(cfg, tokenizer).sft_examples()
    # 500 posts + 1,945 judged queries, none of them the same post
    assert len(examples) == 2445
    for ex in examples:
        assert TLDR_PROMPT.match(ex.prompt), ex.prompt[:200]
        assert ex.completion.startswith(" ") and not ex.completion.startswith("  ")
        assert len(tokenizer(ex.prompt, add_special_tokens=False).input_ids) <= cfg.max_prompt_tokens
    assert examples[0].prompt.startswith("SUBREDDIT: r/relationships\n\nTITLE: Me [19 F] with my friend")


def test_tldr_vendored_preferences_are_the_judged_rows(tokenizer):
    pairs = get_format(data_cfg("tldr"), tokenizer).preference_examples()
    assert len(pairs) == 1000  # 640 "ours" + 360 "reference"
    assert all(TLDR_PROMPT.match(p.prompt) and p.chosen != p.rejected for p in pairs)


def test_hh_rlhf_vendored_pairs_split_at_the_last_assistant_turn(tokenizer):
    pairs = get_format(data_cfg("hh_rlhf", "data.chat_template=none"), tokenizer).preference_examples()
    # 8,552 rows in the four test splits, less those whose replies are identical or whose prompts differ
    assert 8000 < len(pairs) <= 8552
    for p in pairs:
        assert p.prompt.startswith("\n\nHuman:") and p.prompt.endswith("\n\nAssistant:")
        assert "\n\nAssistant:" not in p.chosen and "\n\nAssistant:" not in p.rejected
    assert len(get_format(data_cfg("hh_rlhf", "data.subsets=[harmless-base]"), tokenizer).preference_examples()) < 2312 + 1


def test_hh_rlhf_dialogues_go_through_the_chat_template_as_messages(tokenizer):
    from rlhf_exp.data.formats.hh_rlhf import dialogue_messages
    from rlhf_exp.data.formats import is_chat

    plain = get_format(data_cfg("hh_rlhf", "data.chat_template=none"), tokenizer).preference_examples()
    templated = get_format(data_cfg("hh_rlhf"), tokenizer).preference_examples()
    assert len(plain) == len(templated) and is_chat(data_cfg("hh_rlhf"), tokenizer)
    assert not is_chat(data_cfg("hh_rlhf", "data.chat_template=none"), tokenizer)
    for before, after in zip(plain[:50], templated):
        turns = dialogue_messages(before.prompt)
        assert [t["role"] for t in turns][::2] == ["user"] * ((len(turns) + 1) // 2)  # they alternate, user first
        assert after.prompt == tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        assert after.prompt.endswith("<|im_start|>assistant\n") and "\n\nHuman:" not in after.prompt
        assert (after.chosen, after.rejected) == (before.chosen.strip(), before.rejected.strip())
    assert dialogue_messages("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:") == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]


def test_split_dialogue_by_hand():
    text = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: see you"
    assert split_dialogue(text) == ("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:", " see you")
    assert split_dialogue("no turns") is None


def test_sharegpt_vendored_uses_the_chat_template(tokenizer):
    cfg = data_cfg("sharegpt")
    pairs = get_format(cfg, tokenizer).preference_examples()
    assert len(pairs) == 300
    assert all(p.prompt.startswith("<|im_start|>") and p.prompt.endswith("<|im_start|>assistant\n") for p in pairs)
    sft = get_format(cfg, tokenizer).sft_examples()
    assert len(sft) == 300 and sft[0].completion == pairs[0].chosen


def test_jsonl_vendored_example_and_configurable_fields(tokenizer, tmp_path):
    assert len(get_format(data_cfg("jsonl"), tokenizer).sft_examples()) == 400
    path = tmp_path / "mine.jsonl"
    path.write_text('{"q": "Question?", "a": " Answer."}\n\n{"q": "Two?", "a": " Yes."}\n')
    cfg = data_cfg("jsonl", f"data.path={path}", "data.fields.prompt=q", "data.fields.completion=a")
    examples = get_format(cfg, tokenizer).sft_examples()
    assert [(e.prompt, e.completion) for e in examples] == [("Question?", " Answer."), ("Two?", " Yes.")]
    assert examples[1].origin.endswith("mine.jsonl:3")


def test_tldr_post_is_cut_at_newline_boundaries(tokenizer):
    paragraphs = [f"Paragraph {i} " + " ".join(["word"] * 30) for i in range(12)]
    post = "\n".join(paragraphs)
    prompt = tldr_prompt("test", "A title", post, tokenizer, max_tokens=150)
    assert len(tokenizer(prompt, add_special_tokens=False).input_ids) <= 150
    kept = prompt[prompt.index("POST: ") + 6: prompt.index("\n\nTL;DR:")]
    assert post.startswith(kept) and post[len(kept)] == "\n"  # cut exactly before a newline
    assert kept.count("\n") >= 1
    one_more = post[: post.index("\n", len(kept) + 1)]  # the longest cut that fits is kept
    longer = TLDR_TEMPLATE.format(subreddit="test", title="A title", post=one_more)
    assert len(tokenizer(longer, add_special_tokens=False).input_ids) > 150


def test_tldr_prompts_kept_in_the_process_follow_the_token_budget(tokenizer):
    def prompts(max_tokens):
        return [e.prompt for e in get_format(data_cfg("tldr", f"data.max_prompt_tokens={max_tokens}"),
                                             tokenizer).sft_examples()]

    short, long, short_again = prompts(64), prompts(256), prompts(64)
    assert short == short_again and short != long
    assert max(len(tokenizer(p, add_special_tokens=False).input_ids) for p in short) <= 64
    assert max(len(tokenizer(p, add_special_tokens=False).input_ids) for p in long) > 64


def test_tldr_post_without_newlines_is_cut_by_tokens(tokenizer):
    prompt = tldr_prompt("test", "A title", "word " * 500, tokenizer, max_tokens=100)
    assert 90 <= len(tokenizer(prompt, add_special_tokens=False).input_ids) <= 100
    assert prompt.endswith("\n\nTL;DR:")
    assert tldr_prompt("s", "t", "short", tokenizer, 100) == TLDR_TEMPLATE.format(subreddit="s", title="t", post="short")


@pytest.mark.parametrize("name", ["tldr", "hh_rlhf"])
def test_train_and_validation_are_disjoint_by_prompt_and_fixed_by_seed(tokenizer, name):
    cfg = data_cfg(name)
    loader = load_sft_splits
    train, val = loader(cfg, tokenizer, seed=1)
    assert len(val) >= cfg.val_size
    assert not {e.prompt for e in train} & {e.prompt for e in val}
    again_train, again_val = loader(cfg, tokenizer, seed=1)
    assert (again_train, again_val) == (train, val)
    _, other_val = loader(cfg, tokenizer, seed=2)
    assert {e.prompt for e in other_val} != {e.prompt for e in val}


def test_preference_splits_are_disjoint(tokenizer):
    train, val = load_preference_splits(data_cfg("hh_rlhf"), tokenizer, seed=0)
    assert len(val) >= 1000 and not {p.prompt for p in train} & {p.prompt for p in val}


def test_split_keeps_every_row_of_a_prompt_together():
    from rlhf_exp.data.formats import SFTExample

    rows = [SFTExample(f"p{i % 5}", str(i)) for i in range(20)]  # 4 rows per prompt
    train, val = split_by_prompt(rows, val_size=3, seed=0)
    assert len(val) == 4 and len(train) == 16
    assert len({r.prompt for r in val}) == 1


# ------------------------------------------------------------------ bad input


def test_missing_data_file_is_named(tokenizer, tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=re.escape(f"{missing}: file not found")):
        get_format(data_cfg("jsonl", f"data.path={missing}"), tokenizer).sft_examples()


def test_malformed_json_line_is_named_by_file_and_line(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": }\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: invalid JSON") as info:
        get_format(data_cfg("jsonl", f"data.path={path}"), tokenizer).sft_examples()
    assert info.value.line == 2


def test_missing_field_names_the_field_line_and_config_key(tokenizer, tmp_path):
    path = tmp_path / "fields.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(DataError, match=r"line 2: missing field 'completion' \(the field name is set by `data.fields.completion`\)"):
        get_format(data_cfg("jsonl", f"data.path={path}"), tokenizer).sft_examples()


def test_gzipped_hh_file_with_broken_dialogue(tokenizer, tmp_path):
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "no turns here"}) + "\n")
    with pytest.raises(DataError, match=r"hh\.jsonl\.gz, line 1: dialogue has no"):
        get_format(data_cfg("hh_rlhf", "data.source=file", f"+data.path={path}"), tokenizer).preference_examples()


def test_val_size_too_large_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match="data.val_size"):
        load_sft_splits(data_cfg("jsonl", "data.val_size=400"), tokenizer, seed=0)


def test_tldr_prompts_kept_on_disk_are_the_ones_fitted_again(tokenizer, tmp_path, monkeypatch):
    """The next process reads the fitted prompts from paths.cache_dir instead of re-tokenizing ~9 s; they
    must be exactly what fitting gives (a stale or wrongly keyed file would change the data silently)."""
    from rlhf_exp.data.formats import tldr as formats

    cfg = data_cfg("tldr", "data.max_prompt_tokens=96")
    monkeypatch.setattr(formats, "_TLDR_PROMPTS", {})  # a fresh process
    fitted = get_format(cfg, tokenizer, tmp_path).sft_examples()
    [kept] = list((tmp_path / "tldr_prompts").glob("*_96.json"))
    monkeypatch.setattr(formats, "_TLDR_PROMPTS", {})
    calls = []
    monkeypatch.setattr(formats, "tldr_prompt", lambda *a, **k: calls.append(a) or "")
    assert get_format(cfg, tokenizer, tmp_path).sft_examples() == fitted and not calls  # all from the file
    assert not list((tmp_path / "tldr_prompts").glob("*_64.json"))  # another budget is another file
    kept.write_text("{not json")  # a broken file is fitted again, not trusted
    monkeypatch.setattr(formats, "_TLDR_PROMPTS", {})
    get_format(cfg, tokenizer, tmp_path).sft_examples()
    assert len(calls) >= len({e.prompt for e in fitted})  # every post fitted again (what that gives: above)


def test_tokenized_examples_kept_on_disk_are_the_ones_tokenized_again(tokenizer, tmp_path, monkeypatch):
    """The next process reads tokenized splits from paths.cache_dir (~3 s saved per TL;DR run); an entry
    must be exactly what tokenizing gives, and other texts or caps must never hit it (a stale or wrongly
    keyed entry would change the training data silently)."""
    from rlhf_exp.data import collate
    from rlhf_exp.data.collate import tokenize_examples
    from rlhf_exp.data.formats import PreferenceExample, SFTExample

    sft = [SFTExample("SUBREDDIT: r/a\n\nPOST: one two\n\nTL;DR:", " three", "a.jsonl:1"),
           SFTExample("hello there", " general kenobi four five six seven", "a.jsonl:2")]
    pairs = [PreferenceExample("Human: hi", " hello", " go away", "b.jsonl:1")]
    caps = dict(max_prompt_tokens=64, max_response_tokens=16)
    fresh = tokenize_examples(sft, tokenizer, **caps, cache_dir=tmp_path)
    fresh_pairs = tokenize_examples(pairs, tokenizer, **caps, cache_dir=tmp_path)
    assert len(list((tmp_path / "tokenized").glob("*.json"))) == 2
    assert fresh == tokenize_examples(sft, tokenizer, **caps)  # what the cache holds is what tokenizing gives

    with monkeypatch.context() as m:  # a fresh process: everything from the files
        m.setattr(collate, "tokenize_sft", lambda *a, **k: pytest.fail("tokenized again"))
        m.setattr(collate, "tokenize_pair", lambda *a, **k: pytest.fail("tokenized again"))
        assert tokenize_examples(sft, tokenizer, **caps, cache_dir=tmp_path) == fresh
        assert tokenize_examples(pairs, tokenizer, **caps, cache_dir=tmp_path) == fresh_pairs
        assert [type(x) for x in fresh_pairs] == [collate.TokenizedPair]
    # another cap, another text, another end token: other entries, never the kept one
    shorter = tokenize_examples(sft, tokenizer, max_prompt_tokens=64, max_response_tokens=2, cache_dir=tmp_path)
    assert shorter != fresh and all(len(x.response_ids) <= 2 for x in shorter)
    edited = [sft[0], SFTExample(sft[1].prompt, " general kenobi", sft[1].origin)]
    assert tokenize_examples(edited, tokenizer, **caps, cache_dir=tmp_path)[1] != fresh[1]
    assert tokenize_examples(sft, tokenizer, **caps, end_id=7, cache_dir=tmp_path)[0].response_ids[-1] == 7
    assert len(list((tmp_path / "tokenized").glob("*.json"))) == 5
    for kept in (tmp_path / "tokenized").glob("*.json"):  # a broken entry is tokenized again, not trusted
        kept.write_text("{not json")
    assert tokenize_examples(sft, tokenizer, **caps, cache_dir=tmp_path) == fresh


def test_blended_sources_join_by_weight_before_the_split(tokenizer):
    from rlhf_exp.data import blended_examples

    tldr = get_format(data_cfg("tldr"), tokenizer).preference_examples()
    # dialogues mixed into plain-text data come as plain text (their responses end as TL;DR's do)
    hh = get_format(data_cfg("hh_rlhf", "data.chat_template=none"), tokenizer).preference_examples()
    for weight, extra in ((0.25, round(0.25 * len(hh))), (2, 2 * len(hh))):
        cfg = data_cfg("tldr", f"data.blend={{hh_rlhf: {weight}}}")
        blended = blended_examples(cfg, tokenizer, 42, "preference")
        assert len(blended) == len(tldr) + extra
        assert blended[: len(tldr)] == tldr
        assert {x.prompt for x in blended[len(tldr):]} <= {x.prompt for x in hh}
    # the sample is seeded: the same half every run, another seed another half
    cfg = data_cfg("tldr", "data.blend={hh_rlhf: 0.5}")
    assert blended_examples(cfg, tokenizer, 42, "sft") == blended_examples(cfg, tokenizer, 42, "sft")
    assert blended_examples(cfg, tokenizer, 42, "sft") != blended_examples(cfg, tokenizer, 7, "sft")
    # phases still split by prompt: no blended prompt is in two phases' training data or in the held-out set
    phases = {phase: load_preference_splits(data_cfg("tldr", "data.blend={hh_rlhf: 1}", f"data.phase={phase}"),
                                            tokenizer, 42) for phase in ("sft", "rm", "rl")}
    held_out = {x.prompt for x in phases["rm"][1]}
    trains = [{x.prompt for x in train} for train, _ in phases.values()]
    assert not any(a & b for i, a in enumerate(trains) for b in trains[i + 1:])
    assert not any(t & held_out for t in trains)
    assert any(x.prompt in {h.prompt for h in hh} for x in phases["rm"][0])  # HH pairs did reach a phase


def test_a_blend_of_an_unknown_or_mismatched_source_names_the_key(tokenizer):
    from rlhf_exp.data import blended_examples

    with pytest.raises(ConfigError, match=r"data.blend.nope.*no conf/data/nope.yaml"):
        blended_examples(data_cfg("tldr", "data.blend={nope: 1}"), tokenizer, 42, "sft")
    with pytest.raises(ConfigError, match=r"data.blend.sharegpt.*chat"):
        blended_examples(data_cfg("tldr", "data.blend={sharegpt: 1}"), tokenizer, 42, "sft")
    from rlhf_exp.config import validate

    with pytest.raises(ConfigError, match=r"data.blend.*weight > 0"):
        validate(resolved(compose_config(["model=tiny", "data=tldr", "data.blend={hh_rlhf: -1}"])))


def test_a_prefix_of_the_held_out_pairs_draws_from_every_hh_subset(tmp_path):
    """stage.eval_examples takes the first held-out pairs. Before: they kept the file's order, and HH-RLHF's file
    order is its four subsets one after another, so the first 200 held-out pairs were all harmless-base (the RM
    on HH scored below chance, and fell as it learned the mixture)."""
    from pathlib import Path

    from helpers import tiny_config
    from rlhf_exp.data import data_tokenizer, load_preference_splits

    cfg = tiny_config(tmp_path, "data=hh_rlhf")
    tokenizer, _ = data_tokenizer(cfg.model, cfg.data, cfg.paths.cache_dir)
    _, held_out = load_preference_splits(cfg.data, tokenizer, cfg.seed)
    subsets = [Path(pair.origin.rsplit(":", 1)[0]).name.split(".")[0] for pair in held_out[:200]]
    shares = {name: subsets.count(name) / len(subsets) for name in set(subsets)}
    assert set(shares) == {"harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled"}
    assert all(0.08 < share < 0.45 for share in shares.values()), shares  # about 27 / 28 / 13 / 32 %


def test_held_out_rows_come_in_one_prompt_order_whatever_the_file_order():
    """A prefix of the held-out rows is the same prompts in every list that holds them (a pipeline's SFT posts and
    preference pairs, a file read in another order), and not the file's first rows."""
    from rlhf_exp.data.formats import SFTExample
    from rlhf_exp.data.splits import split_by_phase

    rows = [SFTExample(f"p{i}", "a") for i in range(200)]
    for split in (lambda r: split_by_prompt(r, 40, seed=3)[1],
                  lambda r: split_by_phase(r, "sft", {"sft": 1, "rm": 1}, 0.2, seed=3)[1]):
        forward, backward = split(rows), split(list(reversed(rows)))
        assert [r.prompt for r in forward] == [r.prompt for r in backward]
        positions = [int(r.prompt[1:]) for r in forward]
        assert positions != sorted(positions) and positions != sorted(positions, reverse=True)
