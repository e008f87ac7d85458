"""Bad input is one line naming what to change, refused before a tracker run exists: config values the
schema let through, an empty data file, a reward option left without its model, a YAML syntax error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import GRPO, mlflow_runs, tiny_config
from rlhf_exp.launch.run import run
from rlhf_exp.errors import ConfigError, DataError, UserInputError


def no_runs_in(tmp_path: Path) -> bool:
    return mlflow_runs(tmp_path / "mlflow.db")[1] == []


def test_a_negative_seed_is_refused(tmp_path):
    """Before: seed=-1 was accepted (numpy refuses negative seeds; torch wraps them)."""
    with pytest.raises(ConfigError) as refused:
        run(tiny_config(tmp_path, "seed=-1"))
    assert refused.value.key == "seed" and "from 0 to 2**32 - 1" in str(refused.value)
    assert no_runs_in(tmp_path)


def test_more_threads_than_usable_cores_are_refused(tmp_path):
    """Before: hardware.num_threads=1000 was accepted and each step ran ~10x slower."""
    usable = len(os.sched_getaffinity(0))
    with pytest.raises(ConfigError) as refused:
        run(tiny_config(tmp_path, f"hardware.num_threads={usable + 1}"))
    assert refused.value.key == "hardware.num_threads"
    assert f"{usable + 1} threads on the {usable} cores this process may use" in str(refused.value)
    assert no_runs_in(tmp_path)


def test_an_empty_data_file_is_said_to_be_empty_not_a_val_size_problem(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError) as refused:
        run(tiny_config(tmp_path, "data=jsonl", f"data.path={empty}", "stage.max_steps=1"))
    assert str(refused.value) == f"{empty}: holds no SFT examples: the file is empty"
    assert no_runs_in(tmp_path)  # refused before the tracker run was created


def test_a_reward_model_option_without_its_model_is_refused_naming_the_key(tmp_path):
    """Before: reward=reward_model with no reward.fn.path created an MLflow run, then died with a raw
    omegaconf MissingMandatoryValue traceback."""
    with pytest.raises(ConfigError) as refused:
        run(tiny_config(tmp_path, *(o for o in GRPO if not o.startswith("reward.")), "stage.minibatch_size=8",
                        "reward=reward_model"))
    assert refused.value.key == "reward.fn.path" and "<rm run>/checkpoints/final" in str(refused.value)
    assert no_runs_in(tmp_path)


def test_a_yaml_syntax_error_in_a_chosen_file_is_one_line_with_file_line_and_column(tmp_path):
    """Before: a 95-line Hydra traceback whose last lines named the file."""
    from rlhf_exp.config import check_yaml_of_choices

    (tmp_path / "experiment").mkdir()
    (tmp_path / "config.yaml").write_text("seed: 42\n")
    (tmp_path / "experiment" / "good.yaml").write_text("stage:\n  lr: 1e-3\n")
    broken = tmp_path / "experiment" / "broken.yaml"
    broken.write_text("stage:\n  lr: [1e-3\n  max_steps: 2\n")
    check_yaml_of_choices(["experiment=good", "stage.lr=1"], tmp_path)
    for chosen in ("experiment=broken", "experiment=good,broken"):
        with pytest.raises(UserInputError) as refused:
            check_yaml_of_choices(["model=tiny", chosen], tmp_path)
        assert str(refused.value) == f"{broken}, line 3, column 12: expected ',' or ']', but got ':' (YAML syntax)"
