"""The declared metric vocabulary (rlhf_exp/vocabulary.py): what the README's table shows, how names match
their declarations, and the guard (tests/conftest.py) that fails any test whose run logs an undeclared name."""

from __future__ import annotations

import pytest

from helpers import ROOT
from rlhf_exp.tracking.base import Tracker
from rlhf_exp.vocabulary import METRICS, declared, label, markdown_table


def test_the_readme_shows_the_vocabulary_as_declared():
    """Catches a metric declared (or changed) in the code but not in the README's table, or the reverse."""
    assert markdown_table() in (ROOT / "README.md").read_text()


def test_a_name_matches_its_declaration_and_a_near_miss_matches_none():
    assert declared("eval/accuracy").pattern == "eval/accuracy"
    assert declared("time/rollout_s").pattern == "time/{phase}_s"
    assert declared("train/rewards/accuracy_reward/mean").pattern == "train/rewards/{function}/mean"
    for near_miss in ("eval/acuracy", "train/rewards/x/mean/extra", "eval/accuracy_low", "time/rollout"):
        assert declared(near_miss) is None, near_miss
    assert label("eval/kl") == "KL(policy || reference) (nats / token)" and label("train/lr") == "train/lr"


def test_every_declaration_is_unique_and_says_which_way_is_better():
    patterns = [metric.pattern for metric in METRICS]
    assert len(patterns) == len(set(patterns))
    assert all(metric.better in ("max", "min", "") and metric.meaning for metric in METRICS)


def test_a_run_that_logs_an_undeclared_metric_fails_its_test():
    """The guard every test's runs go through: without it a stage's new metric reaches tables unexplained."""
    Tracker().log_metrics({"train/loss": 1.0}, step=0)
    with pytest.raises(pytest.fail.Exception, match=r"not declared.*train/lossy"):
        Tracker().log_metrics({"train/lossy": 1.0}, step=0)
