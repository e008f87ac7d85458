"""data=file / data=hub: TRL's dataset types in both styles, through the stages that use them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import GRPO, mlflow_runs, tiny_config
from rlhf_exp.config import compose_config, resolved
from rlhf_exp.data.formats import get_format, is_chat
from rlhf_exp.data.formats.hf import extract_prompt
from rlhf_exp.errors import ConfigError

ROWS = 24


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


# (TRL type and style, the stage that uses it, a row builder)
DATASETS = {
    "language_modeling/standard": ("sft", lambda i: {"text": f"Document {i}: the cat sat on mat number {i}."}),
    "language_modeling/conversational": ("sft", lambda i: {"messages": user(f"Count to {i}") + assistant(f"1 to {i}")}),
    "prompt_only/standard": ("grpo", lambda i: {"prompt": f"Say something about {i}:"}),
    "prompt_only/conversational": ("grpo", lambda i: {"prompt": user(f"Say something about {i}")}),
    "prompt_completion/standard": ("sft", lambda i: {"prompt": f"{i} + 1 =", "completion": f" {i + 1}"}),
    "prompt_completion/conversational": ("sft", lambda i: {"prompt": user(f"{i} + 1?"), "completion": assistant(f"{i + 1}")}),
    "preference/standard": ("dpo", lambda i: {"prompt": f"Is {i} even?", "chosen": f" {'yes' if i % 2 == 0 else 'no'}",
                                              "rejected": f" {'no' if i % 2 == 0 else 'yes'}"}),
    "preference/conversational": ("dpo", lambda i: {"prompt": user(f"Is {i} even?"), "chosen": assistant("Let me see."),
                                                    "rejected": assistant("No idea.")}),
    "unpaired_preference/standard": ("kto", lambda i: {"prompt": f"Is {i} even?", "completion": f" {'yes' if i % 3 else 'no'}",
                                                       "label": i % 2 == 0}),
    "unpaired_preference/conversational": ("kto", lambda i: {"prompt": user(f"Is {i} even?"), "completion": assistant("Yes."),
                                                             "label": i % 2 == 1}),
    "implicit_preference/standard": ("rm", lambda i: {"chosen": f"Q{i}: the sky is blue", "rejected": f"Q{i}: the sky is green"}),
    "implicit_preference/conversational": ("rm", lambda i: {"chosen": user(f"Sky {i}?") + assistant("Blue."),
                                                            "rejected": user(f"Sky {i}?") + assistant("Green.")}),
}
STAGE_ARGS = {"sft": ["stage=sft"], "dpo": ["stage=dpo", "stage.num_samples=0"],
              "rm": ["stage=rm", "stage.norm_examples=4"], "grpo": [*GRPO, "stage.minibatch_size=8"],
              "kto": ["stage=kto", "stage.batch_size=4"]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def data_cfg(path: Path, *overrides: str):
    return resolved(compose_config(["model=tiny", "data=file", f"data.path={path}", "data.val_size=4", *overrides])).data


@pytest.mark.parametrize("kind", sorted(DATASETS))
def test_every_trl_type_and_style_trains_in_the_stage_that_uses_it(tmp_path, kind):
    from rlhf_exp.launch import run as app

    stage, row = DATASETS[kind]
    path = write_jsonl(tmp_path / "data.jsonl", [row(i) for i in range(ROWS)])
    app.run(tiny_config(tmp_path, *STAGE_ARGS[stage], "data=file", f"data.path={path}", "data.val_size=4",
                        "stage.max_steps=1", "stage.eval_examples=4", "stage.num_samples=0"))
    run = mlflow_runs(tmp_path / "mlflow.db")[1][-1]
    assert run.info.status == "FINISHED"
    assert run.data.tags["data.num_train"] == str(ROWS - 4)  # every row read, none dropped, 4 held out
    assert run.data.params["data.format"] == "trl"


def test_a_conversational_dpo_record_after_templating(tokenizer, tmp_path, capsys):
    from rlhf_exp.data.collate import tokenize_pair
    from rlhf_exp.data.tokens import end_of_turn_id

    record = {"prompt": user("What is 2 + 2?"), "chosen": assistant("4"), "rejected": assistant("5")}
    cfg = data_cfg(write_jsonl(tmp_path / "prefs.jsonl", [record] * 2))
    pair = get_format(cfg, tokenizer).preference_examples()[0]
    # the prompt is the tokenizer's own template with the assistant's header, the responses the turns' text
    assert pair.prompt == tokenizer.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True)
    assert pair.prompt.endswith("<|im_start|>assistant\n") and (pair.chosen, pair.rejected) == ("4", "5")
    assert is_chat(cfg, tokenizer)
    tokens = tokenize_pair(pair, tokenizer, 128, 16, end_of_turn_id(tokenizer))
    # each response ends with the template's end of turn, so the model learns to stop where chat does
    assert tokenizer.decode(tokens.chosen_ids) == "4<|im_end|>"
    assert tokenizer.decode(tokens.rejected_ids) == "5<|im_end|>"
    with capsys.disabled():
        print(f"\nconversational DPO record {json.dumps(record)}\n -> prompt {pair.prompt!r}\n"
              f" -> chosen {tokenizer.decode(tokens.chosen_ids)!r}  rejected {tokenizer.decode(tokens.rejected_ids)!r}")


def test_the_implicit_prompt_is_the_common_prefix_as_trl_extracts_it():
    # strings: the prefix stops before the space that starts the differing word
    assert extract_prompt("The sky is blue", "The sky is green") == ("The sky is", " blue", " green")
    # messages: the shared turns
    shared = user("hi")
    assert extract_prompt(shared + assistant("a"), shared + assistant("b")) == (shared, assistant("a"), assistant("b"))


def test_parquet_and_save_to_disk_folders_read_the_same_rows_as_json_lines(tokenizer, tmp_path):
    import datasets

    rows = [DATASETS["preference/standard"][1](i) for i in range(8)]
    from_jsonl = get_format(data_cfg(write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer).preference_examples()
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                                   "test": datasets.Dataset.from_list(rows[:2])})
    splits.save_to_disk(str(tmp_path / "saved"))
    datasets.Dataset.from_list(rows[:3]).save_to_disk(str(tmp_path / "one_split"))

    def texts(path, *overrides):
        examples = get_format(data_cfg(path, *overrides), tokenizer).preference_examples()
        return [(e.prompt, e.chosen, e.rejected) for e in examples]

    expected = [(e.prompt, e.chosen, e.rejected) for e in from_jsonl]
    assert texts(tmp_path / "p.parquet") == expected
    assert texts(tmp_path / "saved") == expected  # data.split=train of a DatasetDict
    assert texts(tmp_path / "saved", "data.split=test") == expected[:2]
    assert texts(tmp_path / "one_split") == expected[:3]
    with pytest.raises(ConfigError, match="data.split.*has splits \\['test', 'train'\\], not 'validation'"):
        texts(tmp_path / "saved", "data.split=validation")


def test_the_hub_loader_reads_a_data_set_the_way_load_dataset_finds_one(tokenizer, tmp_path):
    """data=hub goes through datasets.load_dataset(path, name, split): a repository-shaped folder (a hub
    data set as it is downloaded) exercises it offline, with its column mapping."""
    import datasets

    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    rows = [{"question": f"q{i}", "good": f" a{i}", "bad": f" b{i}"} for i in range(6)]
    datasets.Dataset.from_list(rows).to_parquet(str(repo / "train-00000-of-00001.parquet"))
    cfg = compose_config(["model=tiny", "data=hub", f"data.path={tmp_path / 'repo'}", "data.columns.prompt=question",
                          "data.columns.chosen=good", "data.columns.rejected=bad"]).data
    examples = get_format(cfg, tokenizer).preference_examples()
    assert [(e.prompt, e.chosen, e.rejected) for e in examples] == [(r["question"], r["good"], r["bad"]) for r in rows]
    assert examples[0].origin.startswith("hub:")


@pytest.mark.parametrize("overrides, key, message", [
    (["data=jsonl", "data.source=hub"], "data.source", "reads a local file"),  # it read the vendored sample
    (["data=hub"], "data.path", "needs data.path"),
    (["data=hub", "data.path=/nonexistent/set"], "data.path", "could not load hub data set"),
    (["data=file"], "data.path", "needs data.path"),
    (["data=file", "data.path=<rows>", "data.columns.chosen=better"], "data.columns.chosen", "no column 'better'"),
    (["data=file", "data.path=<prompts>"], "data.format", "prompt_only data set, which has no preference pairs"),
])
def test_a_source_or_column_that_is_not_there_stops_naming_the_key(tokenizer, tmp_path, overrides, key, message):
    rows = write_jsonl(tmp_path / "rows.jsonl", [DATASETS["preference/standard"][1](i) for i in range(4)])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [DATASETS["prompt_only/standard"][1](i) for i in range(4)])
    overrides = [o.replace("<rows>", str(rows)).replace("<prompts>", str(prompts)) for o in overrides]
    cfg = compose_config(["model=tiny", *overrides]).data
    with pytest.raises(ConfigError) as refused:
        get_format(cfg, tokenizer).preference_examples()
    assert refused.value.key == key and message in str(refused.value)


def test_a_tokenizer_without_a_template_is_refused_for_conversations_unless_data_chat_template_is_set(tmp_path):
    from rlhf_exp.data.tokens import end_of_turn_id, with_chat_template
    from rlhf_exp.models import load_tokenizer

    cfg = compose_config(["model=tiny"])
    base = load_tokenizer(cfg.model, cfg.paths.cache_dir)  # a fresh one: the fixture's is shared
    base.chat_template = None  # as a base model's
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": user("hi"), "completion": assistant("hello")}] * 2)
    with pytest.raises(ConfigError, match="data.chat_template.*there is no chat template .the tokenizer has none"):
        get_format(data_cfg(path), base).sft_examples()
    chatml = data_cfg(path, "data.chat_template=chatml")
    example = get_format(chatml, with_chat_template(base, chatml)).sft_examples()[0]
    assert example.prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert base.convert_ids_to_tokens(end_of_turn_id(base)) == "<|im_end|>"
    jinja = tmp_path / "plain.jinja"
    jinja.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}assistant:{% endif %}")
    plain = data_cfg(path, f"data.chat_template={jinja}")
    assert get_format(plain, with_chat_template(base, plain)).sft_examples()[0].prompt == "user: hi\nassistant:"


def test_documents_modelled_whole_split_one_by_one_not_by_their_shared_start_token(tokenizer, tmp_path):
    rows = [DATASETS["language_modeling/standard"][1](i) for i in range(12)]
    cfg = data_cfg(write_jsonl(tmp_path / "docs.jsonl", rows))
    from rlhf_exp.data import load_sft_splits

    train, val = load_sft_splits(cfg, tokenizer, seed=0)
    assert (len(train), len(val)) == (8, 4)  # split by prompt alone, all 12 went to one side
    assert {e.prompt for e in train + val} == {tokenizer.bos_token or tokenizer.eos_token}


def test_a_mixture_reads_each_source_with_its_own_columns_weight_and_held_out_share(tokenizer, tmp_path):
    from rlhf_exp.data import load_preference_splits

    first = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "chosen": " y", "rejected": " n"} for i in range(20)])
    second = tmp_path / "b.parquet"
    import datasets

    datasets.Dataset.from_list([{"q": f"b{i}", "good": " y", "bad": " n"} for i in range(10)]).to_parquet(str(second))
    sources = (f"data.sources=[{{path: '{first}', val_size: 4}}, {{path: '{second}', weight: 2, val_size: 2, "
               "columns: {prompt: q, chosen: good, rejected: bad}}]")
    train, val = load_preference_splits(data_cfg(first, sources), tokenizer, seed=0)
    by_source = lambda rows, letter: [r for r in rows if r.prompt.startswith(letter)]  # noqa: E731
    assert len(by_source(val, "a")) == 4 and len(by_source(train, "a")) == 16
    # weight 2: each pair twice, and a prompt's two copies stay on one side of the split (val_size counts rows)
    assert len(by_source(val, "b")) == 2 and len(by_source(train, "b")) == 18
    assert len({r.prompt for r in by_source(val, "b")}) == 1
    assert not {r.prompt for r in train} & {r.prompt for r in val}
    with pytest.raises(ConfigError, match=r"data.sources\[0\].*unknown data keys \['colums'\]"):
        load_preference_splits(data_cfg(first, f"data.sources=[{{path: '{first}', colums: {{}}}}]"), tokenizer, 0)


def test_a_run_on_ones_own_file_is_named_by_the_file_not_none():
    """Runs on data=file were named `dpo-tiny-None` with an empty data tag: the name is the file's (or the hub
    set's), the conf/data option's where it has one."""
    from omegaconf import OmegaConf

    from rlhf_exp.data.formats import data_name

    assert data_name(OmegaConf.create({"name": None, "source": "file", "path": "/x/my_prefs.parquet"})) == "my_prefs"
    assert data_name(OmegaConf.create({"name": None, "source": "file", "path": "saved_set/"})) == "saved_set"
    assert data_name(OmegaConf.create({"name": None, "source": "hub", "path": "trl-lib/ultrafeedback"})) == "ultrafeedback"
    assert data_name(OmegaConf.create({"name": "tldr", "source": "vendored", "path": None})) == "tldr"


def test_ktos_examples_are_trls_labelled_rows_or_each_pair_split_into_a_desirable_and_an_undesirable_half(tmp_path):
    from rlhf_exp.data import load_unpaired_splits
    from rlhf_exp.data.formats import LabelledExample

    labelled = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": f"P{i}", "completion": f" C{i}", "label": i % 3 == 0}
                                                   for i in range(12)])
    train, val = load_unpaired_splits(data_cfg(labelled), None, 0)
    assert sorted(e.label for e in train + val) == sorted(i % 3 == 0 for i in range(12))
    assert all(isinstance(e, LabelledExample) and e.completion == f" C{e.prompt[1:]}" for e in train + val)

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"P{i}", "chosen": " good", "rejected": " bad"}
                                                  for i in range(12)])
    train, val = load_unpaired_splits(data_cfg(pairs), None, 0)
    assert len(train) == 20 and len(val) == 4  # data.val_size=4 examples: 2 held-out pairs, both halves of each
    for split in (train, val):
        by_prompt = {}
        for e in split:
            by_prompt.setdefault(e.prompt, set()).add((e.completion, e.label))
        assert all(halves == {(" good", True), (" bad", False)} for halves in by_prompt.values())


def test_a_label_that_is_not_a_boolean_stops_naming_the_line(tmp_path):
    from rlhf_exp.data import load_unpaired_splits
    from rlhf_exp.errors import DataError

    path = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "P", "completion": " C", "label": True}] * 5
                       + [{"prompt": "Q", "completion": " D", "label": "yes"}])
    with pytest.raises(DataError, match=r"kto.jsonl.*line 6.*'label' must be true or false"):
        load_unpaired_splits(data_cfg(path), None, 0)
