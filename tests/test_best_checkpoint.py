"""stage.keep_best: checkpoints/best holds the best held-out evaluation's weights, and run:<stage>@best names it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import PAIRS, metric_history, mlflow_runs, tiny_config, trainer_for
from rlhf_exp.checkpoint import TRAINER_STATE
from rlhf_exp.errors import ConfigError
from rlhf_exp.stages.rm import RewardModelTrainer
from rlhf_exp.stages.spec import metric_direction
from rlhf_exp.stages import stage_spec

RM = ["stage=rm", *PAIRS, "stage.eval_examples=8", "stage.norm_examples=8", "stage.keep_best=true"]


def best_record(trainer) -> dict | None:
    record = trainer.run_dir / "checkpoints" / "best" / "best.json"
    return json.loads(record.read_text()) if record.is_file() else None


def test_the_best_checkpoint_moves_only_on_a_strict_improvement_after_step_0(tmp_path):
    trainer = trainer_for(RewardModelTrainer, tmp_path, *RM)
    # (step, held-out accuracy) -> the step best.json should name afterwards
    for step, accuracy, best_step in [(0, 0.9, None),   # the starting model is the input, not a result
                                      (2, 0.5, 2), (4, 0.7, 4), (6, 0.6, 4),
                                      (8, 0.7, 4)]:      # a tie keeps the earlier one
        trainer.step = step
        trainer.after_evaluation({"eval/accuracy": accuracy, "eval/loss": 1.0 - accuracy})
        record = best_record(trainer)
        assert (record and record["step"]) == best_step
    assert record == {"step": 4, "metric": "eval/accuracy", "direction": "max", "value": 0.7}
    best = trainer.run_dir / "checkpoints" / "best"
    assert (best / "model.safetensors").is_file() and (best / "run_config.json").is_file()
    assert not (best / TRAINER_STATE).exists()  # weights to start from, not a state to resume


def test_a_best_reward_model_is_saved_normalized_and_training_goes_on_unnormalized(tmp_path):
    from rlhf_exp.models.reward import load_reward_model

    trainer = trainer_for(RewardModelTrainer, tmp_path, *RM)
    offset = float(trainer.reference_scores().mean())
    before = trainer.model.reward_mean.clone()
    trainer.step = 1
    trainer.after_evaluation({"eval/accuracy": 0.6})
    assert torch.equal(trainer.model.reward_mean, before)  # the live model is as it was
    saved, _ = load_reward_model(trainer.run_dir / "checkpoints" / "best")
    assert float(saved.reward_mean) == pytest.approx(float(before) + offset, abs=1e-5)  # as on_train_end saves it


def test_best_metric_names_the_direction_and_an_unknown_one_names_the_key(tmp_path):
    rm = stage_spec("rm")
    assert metric_direction(rm) == ("eval/accuracy", "max")
    assert metric_direction(rm, "eval/ece") == ("eval/ece", "min")  # calibration error: smaller is better
    assert metric_direction(stage_spec("sft")) == ("eval/loss", "min")
    trainer = trainer_for(RewardModelTrainer, tmp_path, *RM, "stage.best_metric=eval/acuracy")
    trainer.step = 1
    with pytest.raises(ConfigError, match=r"stage.best_metric.*eval/acuracy.*eval/accuracy"):
        trainer.after_evaluation({"eval/accuracy": 0.6})


def test_a_later_stage_starts_from_an_earlier_runs_best_checkpoint_by_run_id(tmp_path, caplog):
    """SFT keeps its lowest held-out loss; DPO names it as run:<SFT's MLflow run id>@best."""
    from rlhf_exp.launch import run as app

    caplog.set_level("INFO")
    app.run(tiny_config(tmp_path, "stage.max_steps=4", "stage.eval_every=1", "stage.lr=3e-2", "stage.keep_best=true",
                        "stage.num_samples=0"))
    assert "sft step 4/4 held-out: loss" in caplog.text  # the one-line summary per evaluation
    client, [sft_run] = mlflow_runs(tmp_path / "mlflow.db")
    losses = metric_history(client, sft_run, "eval/loss")  # steps 0..4
    best_step = min(range(1, 5), key=lambda s: (losses[s], s))
    best = Path(sft_run.data.tags["run_dir"]) / "checkpoints" / "best"
    assert json.loads((best / "best.json").read_text())["step"] == best_step
    assert sft_run.data.tags["best.step"] == str(best_step)

    app.run(tiny_config(tmp_path, "stage=dpo", *PAIRS, "stage.max_steps=1", "stage.num_samples=0",
                        "stage.eval_examples=8", f"model.init_from=run:{sft_run.info.run_id}@best"))
    _, runs = mlflow_runs(tmp_path / "mlflow.db")
    [dpo_run] = [r for r in runs if r.info.run_id != sft_run.info.run_id]
    assert dpo_run.data.tags["init_from"] == str(best)
    assert dpo_run.data.tags["init_from_run_id"] == sft_run.info.run_id
