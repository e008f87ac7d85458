"""The declared metric vocabulary (rlhf_exp/vocabulary.py): what the README's table shows, how names match
their declarations, and the guard (tests/conftest.py) that fails any test whose run logs an undeclared name."""

from __future__ import annotations

import pytest

from helpers import ROOT
from rlhf_exp.tracking.base import Tracker
from rlhf_exp.vocabulary import METRICS, declared, label, markdown_table


def test_the_docs_show_the_vocabulary_as_declared():
    """Catches a metric declared (or changed) in the code but not in the documented table, or the reverse."""
    assert markdown_table() in (ROOT / "docs" / "layout.md").read_text()


def test_a_name_matches_its_declaration_and_a_near_miss_matches_none():
    assert declared("eval/accuracy").pattern == "eval/accuracy"
    assert declared("time/rollout_s").pattern == "time/{phase}_s"
    assert declared("train/rewards/accuracy_reward/mean").pattern == "train/rewards/{function}/mean"
    for near_miss in ("eval/acuracy", "train/rewards/x/mean/extra", "eval/accuracy_low", "time/rollout"):
        assert declared(near_miss) is None, near_miss
    assert label("eval/kl_k3") == "KL(policy || reference) (nats / token)" and label("train/lr") == "train/lr"


def test_every_declaration_is_unique_and_says_which_way_is_better():
    patterns = [metric.pattern for metric in METRICS]
    assert len(patterns) == len(set(patterns))
    assert all(metric.better in ("max", "min", "") and metric.meaning for metric in METRICS)


def test_a_run_that_logs_an_undeclared_metric_fails_its_test():
    """The guard every test's runs go through: without it a stage's new metric reaches tables unexplained."""
    Tracker().log_metrics({"train/loss": 1.0}, step=0)
    with pytest.raises(pytest.fail.Exception, match=r"not declared.*train/lossy"):
        Tracker().log_metrics({"train/lossy": 1.0}, step=0)


def test_the_progress_bar_and_the_pipeline_line_show_what_the_vocabulary_declares():
    """Catches a hard-coded list in either place (a new stage's declared figures missing from both) and an
    order that is not the vocabulary's."""
    from rlhf_exp.launch.pipeline import summary_line
    from rlhf_exp.vocabulary import shown

    metrics = {"train/lr": 1e-5, "time/step_s": 0.25, "train/loss": 1.5, "eval/accuracy": 0.75, "eval/loss": 2.0,
               "eval/kl_k3": 0.01, "eval/ece": 0.1}
    assert list(shown("bar", metrics).items()) == [("loss", 1.5), ("step_s", 0.25)]
    assert summary_line("rm", metrics, 1.0) == "pipeline: rm finished in 1.0 min: loss=2, accuracy=0.75, kl_k3=0.01"


def test_every_renamed_name_maps_to_a_declared_one_and_a_typed_old_name_still_works(caplog):
    """Catches a rename whose new name is not declared, an old pattern that no longer matches its names, and
    stage.best_metric / sweep.objective refusing or misdirecting a name from before the grammar."""
    from rlhf_exp.stages import stage_spec
    from rlhf_exp.stages.spec import metric_direction
    from rlhf_exp.vocabulary import RENAMED, current_name

    for old, new in RENAMED.items():
        assert declared(new) is not None and declared(new).pattern == new, new
        assert current_name(old.replace("{policy}", "dpo").replace("{judge}", "judge").replace("{other}", "sft")) \
            == new.replace("{policy}", "dpo").replace("{judge}", "judge").replace("{other}", "sft")
    assert current_name("eval/sft/judge_win_vs_reference_low") == "eval/sft/judge_win_vs_reference_ci_low"
    assert current_name("eval/loss") == "eval/loss"
    assert metric_direction(stage_spec("grpo"), "eval/kl") == ("eval/kl_k3", "min")
    assert "eval/kl is logged as eval/kl_k3 now" in caplog.text
    # the vocabulary's direction, where the name alone would have guessed wrong
    assert metric_direction(stage_spec("sft"), "memory/peak_gib") == ("memory/peak_gib", "min")
