"""A NaN or infinite loss or gradient norm stops the run before the update, or skips that update."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from helpers import mlflow_runs, snapshot, tiny_config, trainer_for
from rlhf_exp.launch.run import run
from rlhf_exp.errors import NonFiniteError
from rlhf_exp.stages.sft import SFTTrainer


def poison_gradients_at(trainer, nth_step: int):
    """The gradient of the trainer's `nth_step`-th optimizer step from now becomes NaN, as a diverging loss makes it."""
    real_backward, calls = trainer.backward, {"steps": 0}
    real_step = trainer.optimizer_step

    def backward(loss):
        real_backward(loss * float("nan") if calls["steps"] == nth_step - 1 else loss)

    def optimizer_step():
        calls["steps"] += 1
        return real_step()

    trainer.backward, trainer.optimizer_step = backward, optimizer_step


def test_a_huge_lr_stops_the_run_failed_at_the_first_nonfinite_step_keeping_finite_checkpoints(tmp_path):
    """Before: lr 1e10 gave NaN from step 2 on, NaN checkpoints, and a FINISHED run."""
    cfg = tiny_config(tmp_path, "stage.lr=1e10", "stage.warmup_steps=0", "stage.max_steps=6", "stage.save_every=1",
                      "stage.num_samples=0")
    with pytest.raises(NonFiniteError, match=r"step \d+: train/(grad_norm|loss) is nan") as error:
        run(cfg)
    assert error.value.step >= 2 and "step_" in str(error.value.last_checkpoint)
    checkpoints = sorted((tmp_path / "runs").glob("sft/*/checkpoints/*"))
    assert [c.name for c in checkpoints] == [f"step_{s:06d}" for s in range(1, error.value.step)]  # no "final"
    for folder in checkpoints:
        for name, tensor in load_file(str(folder / "model.safetensors")).items():
            assert torch.isfinite(tensor).all(), (folder.name, name)
    assert mlflow_runs(tmp_path / "mlflow.db")[1][0].info.status == "FAILED"


def test_stop_leaves_the_weights_as_the_last_finite_step_left_them(tmp_path):
    trainer = trainer_for(SFTTrainer, tmp_path, "stage.num_samples=0")
    trainer.step = 0
    trainer.checked(trainer.train_step)
    before = snapshot(trainer.model)
    poison_gradients_at(trainer, 1)
    with pytest.raises(NonFiniteError, match="train/grad_norm is nan"):
        trainer.checked(trainer.train_step)
    for name, value in snapshot(trainer.model).items():
        assert torch.equal(value, before[name]), name


def test_skip_step_drops_the_poisoned_update_and_trains_on(tmp_path):
    trainer = trainer_for(SFTTrainer, tmp_path, "stage.num_samples=0", "stage.on_nonfinite=skip_step")
    before = snapshot(trainer.model)
    poison_gradients_at(trainer, 1)
    skipped = trainer.checked(trainer.train_step)
    assert skipped["train/skipped_steps"] == 1.0
    for name, value in snapshot(trainer.model).items():
        assert torch.equal(value, before[name]), name  # no update, and Adam's state untouched by the NaN
    after = trainer.checked(trainer.train_step)
    assert "train/skipped_steps" not in after and all(torch.isfinite(v).all() for v in snapshot(trainer.model).values())
    assert any(not torch.equal(v, before[k]) for k, v in snapshot(trainer.model).items())
