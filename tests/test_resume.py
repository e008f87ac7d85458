"""A run stopped at a checkpoint and resumed ends where the uninterrupted run ends: RM, GRPO and PPO
(SFT's and DPO's resume tests are in their own files)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import GRPO, PAIRS, PPO, VARIED, mlflow_runs, tiny_config
from rlhf_exp.app import run

STAGES = {
    "rm": ["stage=rm", *PAIRS, "stage.norm_examples=8", "hardware.micro_batch_size.rm=2", "stage.lr=1e-3",
           "stage.batch_size=4"],
    "grpo": [*GRPO, *VARIED, "stage.minibatch_size=4", "hardware.micro_batch_size.grpo=4", "stage.lr=1e-3"],
    # the PPO options whose state lives outside the model: the actor's EMA and the PPO-ptx data stream
    "ppo": [*PPO, "stage.ema_decay=0.9", "stage.ptx_coef=0.5"],
}
FILES = {
    "rm": ["model.safetensors", "reward_head.safetensors"],
    "grpo": ["model.safetensors"],
    "ppo": ["model.safetensors", "ema/model.safetensors", "critic/model.safetensors", "critic/reward_head.safetensors"],
}


def final_run(tmp_path: Path, stage: str, *overrides: str):
    run(tiny_config(tmp_path, *STAGES[stage], "stage.max_steps=4", "stage.num_samples=0", "stage.eval_every=null",
                    *overrides))
    _, runs = mlflow_runs(tmp_path / "mlflow.db")
    return runs[-1]


@pytest.mark.parametrize("stage", ["rm", "grpo", "ppo"])
def test_resumed_run_ends_with_the_uninterrupted_runs_weights(tmp_path, stage):
    whole = final_run(tmp_path / "whole", stage, "stage.save_every=2")
    step2 = Path(whole.data.tags["run_dir"]) / "checkpoints" / "step_000002"
    resumed = final_run(tmp_path / "resumed", stage, f"stage.resume_from={step2}")
    for name in FILES[stage]:
        expected, got = (load_file(str(Path(r.data.tags["checkpoint_dir"]) / name)) for r in (whole, resumed))
        assert expected.keys() == got.keys(), name
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{name}: {key}"
    for key, value in whole.data.metrics.items():
        if key.startswith("train/") and not any(clock in key for clock in ("seconds", "per_s")):
            assert resumed.data.metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_resume_refuses_another_stages_checkpoint_and_changed_training_keys(tmp_path):
    """Before: DPO resumed from an SFT checkpoint died with `KeyError: 'ref_train'`, and a changed stage.lr
    silently kept the old schedule while MLflow recorded the new value."""
    from helpers import PAIRS
    from rlhf_exp.errors import ConfigError

    run(tiny_config(tmp_path / "sft", "stage.max_steps=1", "stage.num_samples=0", "stage.lr=1e-3"))
    _, [sft] = mlflow_runs(tmp_path / "sft" / "mlflow.db")
    folder = sft.data.tags["checkpoint_dir"]
    with pytest.raises(ConfigError, match=rf"stage=sft, and this run is stage=dpo: .*model.init_from={folder}"):
        run(tiny_config(tmp_path / "dpo", "stage=dpo", *PAIRS, f"stage.resume_from={folder}"))
    with pytest.raises(ConfigError) as refused:
        run(tiny_config(tmp_path / "lr", "stage.max_steps=2", "stage.lr=2e-3", "seed=7", f"stage.resume_from={folder}"))
    assert refused.value.key == "stage.resume_from"
    assert "stage.lr: 0.001 -> 0.002" in str(refused.value) and "seed: 42 -> 7" in str(refused.value)
    assert "stage.max_steps" not in str(refused.value).split("cannot change:")[1].split(". Resume")[0]
    # what may change does: two more steps, more held-out examples
    run(tiny_config(tmp_path / "more", "stage.max_steps=3", "stage.num_samples=0", "stage.lr=1e-3",
                    "stage.eval_examples=4", f"stage.resume_from={folder}"))
    client, [more] = mlflow_runs(tmp_path / "more" / "mlflow.db")
    assert sorted(m.step for m in client.get_metric_history(more.info.run_id, "train/loss")) == [2, 3]
