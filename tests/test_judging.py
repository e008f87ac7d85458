"""The statistics stage=eval judges policies with (rlhf_exp/evaluation/)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_exp.evaluation.statistics import length_controlled_win_rate, sampled_kl, win_rate, win_scores
from rlhf_exp.evaluation.text import distinct_n, rouge_l


def test_a_tie_is_half_a_win_and_the_interval_holds_the_rate():
    wins = win_scores(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 4.0, -1.0]))
    assert wins.tolist() == [1.0, 0.5, 0.0, 1.0]
    rate, low, high = win_rate(wins)
    assert rate == 0.625 and 0 < low < rate < high < 1


def test_length_control_removes_a_win_rate_that_comes_only_from_length():
    """A judge that prefers whatever is longer: a policy that is mostly longer wins ~3/4 of the time; at
    equal length its wins are a coin flip, and the length-controlled rate says ~0.5."""
    generator = torch.Generator().manual_seed(0)
    n = 1000
    difference = 4 + 6 * torch.randn(n, generator=generator, dtype=torch.float64)  # tokens longer, mostly
    wins = (torch.rand(n, generator=generator) < torch.sigmoid(difference / 2)).float()
    raw = win_rate(wins)[0]
    lc, low, high = length_controlled_win_rate(wins, difference, resamples=200)
    assert raw > 0.7, raw
    assert low < 0.5 < high and abs(lc - 0.5) < 0.1
    # a policy that is better at every length keeps its edge
    better = (torch.rand(n, generator=generator) < torch.sigmoid(difference / 2 + 1.5)).float()
    assert length_controlled_win_rate(better, difference, resamples=200)[1] > 0.6


def test_rouge_l_is_the_stemmed_longest_common_subsequence_f1_the_papers_report():
    # candidate 4 words, reference 5, common subsequence "the cat on mat": P = 4/4, R = 4/5
    assert rouge_l(["the cat on mat"], ["the cat sat on mat"]) == pytest.approx(2 * 1 * 0.8 / 1.8)
    # as rouge-score with stemming scores it: case, punctuation and inflection do not split words (split on
    # whitespace, "Cats" / "mats." / "sitting" would match nothing)
    assert rouge_l(["Cats sitting on mats."], ["the cat sits on the mat"]) == pytest.approx(2 * 1 * (4 / 6) / (1 + 4 / 6))
    assert rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)  # the mean over pairs
    assert rouge_l([], []) == 0.0


def test_distinct_n_counts_repeats_across_responses():
    assert distinct_n([["a", "b"], ["a", "b"]], 1) == 0.5
    assert distinct_n([["a", "b", "c"], ["d", "e"]], 2) == 1.0
    assert distinct_n([["a"]], 2) == 0.0


def test_sampled_kl_per_sequence_and_per_token():
    per_sequence, per_token = sampled_kl(torch.tensor([-2.0, -4.0]), torch.tensor([-3.0, -7.0]), torch.tensor([2, 6]))
    assert per_sequence == pytest.approx(2.0) and per_token == pytest.approx(4 / 8)
    assert math.isnan(sampled_kl(torch.zeros(1), torch.zeros(1), torch.zeros(1))[1])


def test_a_judge_that_cannot_be_loaded_names_its_key():
    """An unreachable hub id in stage.judge: the error names stage.judge (it named GRPO's reward.fn.path)."""
    from rlhf_exp.errors import ConfigError
    from rlhf_exp.stages.eval import Scorer

    with pytest.raises(ConfigError, match=r"config key `stage.judge`: no-such-org/no-such-reward-model is neither"):
        Scorer("no-such-org/no-such-reward-model", "cpu", "fp32", 2, "stage.judge")


def test_a_judge_at_chance_is_said_to_carry_no_information_and_a_good_one_is_not():
    """The quickstart's judge ranked 8 of 16 held-out pairs right: its win rates (printed to three decimals) mean
    nothing, and the table says so above itself; a judge whose interval clears 0.5 gets no such line."""
    from rlhf_exp.stages.eval import chance_warnings

    [line] = chance_warnings({"judge": (8, 16), "train_rm": (190, 200)})
    assert line.startswith("The judge ranks held-out preference pairs no better than chance (8/16 = 0.500 [")
    assert "carry no information" in line
    assert chance_warnings({"judge": (0, 0)}) == []  # no pairs: nothing to say


def test_the_sampled_kl_interval_holds_zero_when_the_mean_is_noise_and_not_when_it_is_drift():
    from rlhf_exp.evaluation.statistics import mean_interval

    mean, low, high = mean_interval(torch.tensor([0.3, -0.5, 0.1, -0.2, 0.2, -0.05]))  # a k1 mean below 0 by chance
    assert mean < 0 and low < 0 < high
    mean, low, high = mean_interval(torch.tensor([1.0, 1.2, 0.9, 1.1, 1.05, 0.95]))
    assert 0 < low < mean < high and high - low == pytest.approx(2 * 1.96 * float(torch.tensor(
        [1.0, 1.2, 0.9, 1.1, 1.05, 0.95], dtype=torch.float64).std()) / 6 ** 0.5)
