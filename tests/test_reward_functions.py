"""Reward functions as TRL users write them: the calling convention (prompts, completions, completion_ids, data
columns by name, None), weights, refusals, the math rewards, and the math data they check."""

from __future__ import annotations

import math
import os
from functools import partial

import pytest
import torch
from omegaconf import OmegaConf

from helpers import GRPO, ROOT, TINY, metric_history, mlflow_runs, run_cli, tracked_env
from rlhf_exp.data.formats.math_problems import arithmetic_problems, evaluate, gsm8k_final_answer
from rlhf_exp.errors import ConfigError
from rlhf_exp.rewards import RewardFunction, Rewards, build_rewards, length_reward, reward_function_metrics, \
    reward_function_totals, score_responses
from rlhf_exp.rewards.verifiable import final_answer, format_reward, math_reward


class Decoder:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def rewards_of(*functions, on_nan="error"):
    return Rewards([RewardFunction(name, fn, weight, f"reward.funcs[{i}]")
                    for i, (name, fn, weight) in enumerate(functions)], on_nan)


def test_missing_eos_score_replaces_the_sum_not_adds_to_it():
    rewards = rewards_of(("length", partial(length_reward, target_tokens=20), 1.0))
    scores = score_responses(rewards, Decoder(), ["p", "p"], [[1, 2], [1, 3]], stop_token_ids=[2],
                             missing_eos_score=-1.0)
    assert scores.raw.tolist() == pytest.approx([-0.9, -0.9])  # |2 - 20| / 20
    assert scores.rewards.tolist() == pytest.approx([-0.9, -1.0])
    assert scores.stopped == [True, False] and scores.texts == ["1 2", "1 3"]
    kept = score_responses(rewards, Decoder(), ["p"], [[1]], stop_token_ids=[2], missing_eos_score=None)
    assert kept.rewards.tolist() == pytest.approx([-0.95])


def test_every_column_of_the_row_reaches_the_functions_by_name_and_the_sum_is_weighted():
    seen = {}

    def trl_style(prompts, completions, completion_ids, answer, source, trainer_state, **kwargs):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids, answer=answer, source=source,
                    step=trainer_state.global_step, extra=sorted(kwargs))
        return [float(a) for a in answer]

    def skips_odd(completions, **kwargs):  # None: not scored by this function (TRL's semantics)
        return [None if k % 2 else 10.0 for k in range(len(completions))]

    rewards = rewards_of(("trl_style", trl_style, 0.5), ("skips_odd", skips_odd, 2.0))
    rows = [{"answer": "1", "source": "a"}, {"answer": "3", "source": "b"}]
    total, per_function = rewards(["p1", "p2"], ["c1", "c2"], [[5], [6, 7]], rows, step=4)
    assert seen == {"prompts": ["p1", "p2"], "completions": ["c1", "c2"], "ids": [[5], [6, 7]], "answer": ["1", "3"],
                    "source": ["a", "b"], "step": 4, "extra": []}
    assert total.tolist() == pytest.approx([0.5 * 1 + 2.0 * 10, 0.5 * 3])  # a None adds nothing
    assert math.isnan(per_function["skips_odd"][1]) and per_function["trl_style"].tolist() == [1.0, 3.0]
    metrics = reward_function_metrics(reward_function_totals(per_function), "train")
    assert metrics["train/rewards/skips_odd/mean"] == 10.0  # over what it scored, not the None
    assert metrics["train/rewards/trl_style/mean"] == 2.0
    assert metrics["train/rewards/trl_style/std"] == pytest.approx(math.sqrt(2))
    assert "train/rewards/trl_style/ci_low" not in metrics  # not a 0/1 check: no Wilson interval


def test_a_binary_reward_gets_a_wilson_interval():
    metrics = reward_function_metrics(reward_function_totals({"math": torch.tensor([1.0, 0.0, 1.0, 1.0])}), "eval")
    assert metrics["eval/rewards/math/mean"] == 0.75
    assert 0.0 < metrics["eval/rewards/math/ci_low"] < 0.75 < metrics["eval/rewards/math/ci_high"] < 1.0


def test_conversational_rows_get_messages_as_trl_passes_them():
    seen = {}

    def chat_style(prompts, completions, **kwargs):
        seen.update(prompts=prompts, completions=completions)
        return [float(c[0]["content"] == "hi") for c in completions]

    messages = [{"role": "user", "content": "say hi"}]
    total, _ = rewards_of(("chat_style", chat_style, 1.0))(["<rendered>"], ["hi"], [[1]], [{"prompt": messages}])
    assert seen == {"prompts": [messages], "completions": [[{"role": "assistant", "content": "hi"}]]}
    assert total.tolist() == [1.0]


@pytest.mark.parametrize("function, says", [
    (lambda completions, **_: (_ for _ in ()).throw(RuntimeError("grader down")), "raised RuntimeError: grader down"),
    (lambda completions, **_: [1.0] * (len(completions) + 1), "returned 3 values for 2 completions"),
    (lambda completions, **_: ["1"] * len(completions), "returned str '1' for completion 0"),
    (lambda completions, **_: 3.0, "returned float, not a list"),
])
def test_a_broken_function_stops_naming_its_key_and_the_reason(function, says):
    with pytest.raises(ConfigError) as refused:
        rewards_of(("ok", lambda completions, **_: [0.0] * len(completions), 1.0), ("broken", function, 1.0))(
            ["p", "q"], ["a", "b"], [[1], [2]], step=7)
    assert refused.value.key == "reward.funcs[1]" and "\n" not in str(refused.value)
    assert "at global_step 7, reward function broken" in str(refused.value) and says in str(refused.value)


def test_nan_stops_the_run_unless_on_nan_ignore():
    nan_once = ("nan_once", lambda completions, **_: [float("nan"), 1.0], 1.0)
    with pytest.raises(ConfigError, match="returned NaN for completion 0") as refused:
        rewards_of(nan_once)(["p", "q"], ["a", "b"], [[1], [2]])
    assert refused.value.key == "reward.on_nan"
    total, per_function = rewards_of(nan_once, on_nan="ignore")(["p", "q"], ["a", "b"], [[1], [2]])
    assert total.tolist() == [0.0, 1.0] and math.isnan(per_function["nan_once"][0])


def test_a_nan_is_named_even_where_the_no_eos_score_would_replace_it():
    """Before: a NaN from a completion without EOS vanished under reward.missing_eos_score, and elsewhere
    surfaced steps later as `train/grad_norm is nan ... lower stage.lr`."""
    nan_without_eos = ("judge", lambda completions, **_: [float("nan"), 1.0], 1.0)
    with pytest.raises(ConfigError) as refused:
        score_responses(rewards_of(nan_without_eos), Decoder(), ["p", "p"], [[1, 3], [1, 2]], stop_token_ids=[2],
                        missing_eos_score=-1.0, step=5)
    assert refused.value.key == "reward.on_nan"
    assert "at global_step 5, reward function judge (reward.funcs[0]) returned NaN for completion 0" in str(refused.value)


def test_build_takes_a_function_as_it_is_with_its_weight_and_name():
    reward = OmegaConf.create({"fn": None, "on_nan": "error", "funcs": [
        {"_target_": "rlhf_exp.rewards.verifiable.math_reward", "weight": 1.0},
        {"_target_": "rlhf_exp.rewards.length_reward", "target_tokens": 2, "weight": 0.5, "name": "short"}]})
    built = build_rewards(reward, [])
    assert [(f.name, f.weight, f.key) for f in built.functions] == [
        ("math_reward", 1.0, "reward.funcs[0]"), ("short", 0.5, "reward.funcs[1]")]
    total, _ = built(["p"], ["#### 7"], [[1, 2, 3]], [{"answer": "7"}])
    assert total.tolist() == pytest.approx([1.0 + 0.5 * -0.5])
    with pytest.raises(ConfigError, match="reward.funcs.*no reward function"):
        build_rewards(OmegaConf.create({"fn": None, "funcs": []}), [])
    with pytest.raises(ConfigError, match=r"reward.funcs\[0\].weight"):
        build_rewards(OmegaConf.create({"funcs": [{"_target_": "rlhf_exp.rewards.verifiable.format_reward",
                                                   "weight": "high"}]}), [])
    with pytest.raises(ConfigError, match=r"reward.funcs\[0\]._target_.*outside the modules"):
        build_rewards(OmegaConf.create({"funcs": [{"_target_": "os.system"}]}), [])


# ----------------------------------------------------------------------------------------- math rewards

@pytest.mark.parametrize("completion, answer, score", [
    ("7", "7", 1.0), ("The answer is 7.", "7", 1.0), ("3 + 4 = 7", "7", 1.0), ("-3", "-3", 1.0),
    ("so she makes $1,000 a day\n#### 1,000", "1000", 1.0), ("\\boxed{18} (not 19)", "18", 1.0),
    ("about 7.0", "7", 1.0), ("6", "7", 0.0), ("no number", "7", 0.0), ("#### 18 then 19", "18", 1.0),
    ("9 duck eggs, $18", "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs\n#### 18", 1.0),
])
def test_math_reward_reads_the_final_answer_as_gsm8k_and_boxed_say_it(completion, answer, score):
    assert math_reward([completion], answer=[answer]) == [score]
    assert math_reward([[{"role": "assistant", "content": completion}]], answer=[answer]) == [score]


def test_math_reward_leaves_a_row_without_an_answer_unscored_and_needs_the_column():
    assert math_reward(["7", "7"], answer=["7", None]) == [1.0, None]
    with pytest.raises(ValueError, match="answer"):
        math_reward(["7"])


def test_format_reward_wants_the_answer_stated_explicitly():
    assert format_reward(["42", " -3.5 ", "#### 12", "it is \\boxed{4}", "I think 42 or so", ""]) == \
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert final_answer("no digits") is None


# ----------------------------------------------------------------------------------------- math data

def test_generated_arithmetic_is_exact_distinct_and_seeded():
    assert evaluate("3 + 4 * 2") == 11 and evaluate("9 - 2 * 3 - 1") == 2 and evaluate("2 * 3 * 4") == 24
    every = arithmetic_problems(1, 2, ["+", "-", "*"], 300, seed=0)
    assert len(set(every)) == 300 and every == arithmetic_problems(1, 2, ["+", "-", "*"], 300, seed=0)
    assert every != arithmetic_problems(1, 2, ["+", "-", "*"], 300, seed=1)
    drawn = arithmetic_problems(3, 3, ["+", "*"], 500, seed=0)  # a large space: distinct random draws
    assert len(set(drawn)) == 500 and all(len(p.split()) == 5 for p in drawn)
    assert gsm8k_final_answer("... <<2*3=6>>6\n#### 1,200") == "1200" and gsm8k_final_answer("no marker") is None


def test_arithmetic_and_gsm8k_prompts_carry_their_answers_and_splits_are_disjoint(tmp_path):
    from helpers import tiny_config
    from rlhf_exp.data import data_tokenizer, load_prompt_splits

    for data in (["data=arithmetic"], ["data=gsm8k", "data.split=test"]):
        cfg = tiny_config(tmp_path, "stage=grpo", *data)
        tokenizer, _ = data_tokenizer(cfg.model, cfg.data, cfg.paths.cache_dir)
        train, held_out = load_prompt_splits(cfg.data, tokenizer, cfg.seed)
        assert not {x.prompt for x in train} & {x.prompt for x in held_out}
        for example in train[:50] + held_out[:50]:
            assert math_reward([example.completion], answer=[example.row["answer"]]) == [1.0]
    assert len(train) + len(held_out) == 1319  # GSM8K's test split, vendored whole
    with pytest.raises(ConfigError, match="data.num_problems"):
        cfg = tiny_config(tmp_path, "stage=grpo", "data=arithmetic", "data.operations=[+]", "data.num_problems=101")
        load_prompt_splits(cfg.data, tokenizer, cfg.seed)


# ----------------------------------------------------------------------------------------- through the CLI

def env_with_helpers(tmp_path):
    """The CLI's environment with tests/ importable (helpers.rewards is a user's module)."""
    return {**tracked_env(tmp_path), "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"),
                                                                                 os.environ.get("PYTHONPATH")]))}


ARITHMETIC = [*(o for o in GRPO if not o.startswith("reward.")), "data=arithmetic", "reward=math", "stage.minibatch_size=8",
              "allowed_targets=[helpers]", "reward.missing_eos_score=null"]


def test_a_trl_reward_function_reading_a_column_runs_unchanged_beside_a_weighted_one(tmp_path):
    funcs = ("reward.funcs=[{_target_: helpers.rewards.answer_matches_prompt, weight: 0.5},"
             "{_target_: rlhf_exp.rewards.verifiable.format_reward, weight: 2.0, name: fmt}]")
    done = run_cli(*TINY, *ARITHMETIC, funcs, "stage.max_steps=2",
                   "stage.eval_every=2", env=env_with_helpers(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    client, (run,) = mlflow_runs(tmp_path / "m.db")
    matched = metric_history(client, run, "train/rewards/answer_matches_prompt/mean")
    assert matched == [1.0, 1.0]  # every completion was scored with its own prompt's answer column
    assert metric_history(client, run, "eval/rewards/answer_matches_prompt/mean") == [1.0, 1.0]
    fmt, total = metric_history(client, run, "train/rewards/fmt/mean"), metric_history(client, run, "train/reward_mean")
    assert total == pytest.approx([0.5 * 1.0 + 2.0 * f for f in fmt])


def test_a_raising_reward_function_stops_the_run_in_one_line_naming_it(tmp_path):
    done = run_cli(*TINY, *ARITHMETIC, "stage.max_steps=1",
                   "reward.funcs=[{_target_: helpers.rewards.raises}]", env=env_with_helpers(tmp_path))
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert "reward.funcs[0]" in last and "at global_step 0, reward function raises raised RuntimeError: the grader is down" in last
    assert "Traceback" not in done.stderr


def test_the_plan_counts_a_reward_model_listed_in_reward_funcs():
    from rlhf_exp.stages.online import uses_reward_model

    scorer = {"_target_": "rlhf_exp.rewards.RewardModelScorer", "path": "rm/checkpoints/final", "weight": 0.5}
    math_only = {"fn": None, "funcs": [{"_target_": "rlhf_exp.rewards.verifiable.math_reward"}]}
    assert not uses_reward_model(OmegaConf.create({"reward": math_only}))
    assert uses_reward_model(OmegaConf.create({"reward": {**math_only, "funcs": [*math_only["funcs"], scorer]}}))
    assert uses_reward_model(OmegaConf.create({"reward": {"fn": scorer, "funcs": []}}))
