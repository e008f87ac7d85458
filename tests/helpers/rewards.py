"""Reward functions written as TRL users write them (keyword arguments, **kwargs, data columns by name), for the
tests that run them unchanged through `reward.funcs`."""

from __future__ import annotations

import re

from rlhf_exp.data.formats.math_problems import evaluate


def answer_matches_prompt(prompts, completions, answer, **kwargs):
    """1.0 where the row's `answer` column is the value of the problem in the prompt it came with: a reward that
    reads a data set column, and is 1.0 everywhere only if each completion gets its own prompt's row."""
    problems = [re.search(r"What is (.+?)\?", prompt).group(1) for prompt in prompts]
    return [float(str(evaluate(problem)) == str(value)) for problem, value in zip(problems, answer)]


def raises(completions, **kwargs):
    raise RuntimeError("the grader is down")


def one_too_few(completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def a_string(completions, **kwargs):
    return ["1.0"] * len(completions)
