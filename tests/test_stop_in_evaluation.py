"""SIGTERM (docker stop, SLURM preemption) during an evaluation or generation pass stops the run at the pass's
next batch, closed KILLED, and the rerun makes what was cut short. The signal is real (sent to this process
from inside the pass) and goes through the run's own handler."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from helpers import mlflow_runs, tiny_config
from rlhf_exp import stopping
from rlhf_exp.launch.run import run

RUN = ["stage.max_steps=2", "stage.eval_every=null", "stage.num_samples=0", "stage.eval_examples=8",
       "hardware.micro_batch_size.eval=2", "stage.lr=1e-3"]


def sigterm_in_pass(monkeypatch, which: int) -> list[int]:
    """The `which`-th pass (from 1) gets SIGTERM while its first batch runs; returns the batches each pass ran."""
    real, ran = stopping.until_stopped, []

    def until_stopped(batches):
        ran.append(0)
        for number, batch in enumerate(real(batches)):
            ran[-1] += 1
            if len(ran) == which and number == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(stopping, "until_stopped", until_stopped)
    return ran


def test_sigterm_in_the_final_evaluation_stops_at_its_next_batch_and_the_resume_makes_it(tmp_path, monkeypatch):
    """Before: the evaluation ran to its end and the run closed FINISHED (a pipeline exited 0)."""
    ran = sigterm_in_pass(monkeypatch, which=2)  # pass 1: step 0's evaluation; pass 2: the final one
    with pytest.raises(stopping.RunStopped) as stopped:
        run(tiny_config(tmp_path, *RUN))
    assert ran == [4, 1] and stopped.value.exit_code == 143 and stopped.value.step == 2
    client, [killed] = mlflow_runs(tmp_path / "mlflow.db")
    assert killed.info.status == "KILLED" and killed.data.tags["stopped_by"] == "SIGTERM"
    assert [m.step for m in client.get_metric_history(killed.info.run_id, "eval/loss")] == [0]
    checkpoint = Path(killed.data.tags["checkpoint_dir"])
    assert checkpoint.name == "step_000002"
    assert torch.load(checkpoint / "trainer_state.pt", weights_only=True)["eval_pending"] is True

    monkeypatch.undo()
    run(tiny_config(tmp_path, *RUN, f"stage.resume_from={checkpoint.parent.parent}"))
    client, [resumed] = mlflow_runs(tmp_path / "mlflow.db")
    assert resumed.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(resumed.info.run_id, "eval/loss")) == [0, 2]


def test_sigterm_in_the_eval_stage_stops_at_its_next_batch_closed_killed(tmp_path, monkeypatch):
    ran = sigterm_in_pass(monkeypatch, which=1)
    with pytest.raises(stopping.RunStopped) as stopped:
        run(tiny_config(tmp_path, "stage=eval", "stage.eval_examples=4", "hardware.micro_batch_size.eval=1",
                        "stage.generation.max_new_tokens=4"))
    assert ran == [1] and stopped.value.exit_code == 143
    _, [killed] = mlflow_runs(tmp_path / "mlflow.db")
    assert killed.info.status == "KILLED" and killed.data.tags["stopped_by"] == "SIGTERM"


def test_sigterm_while_the_data_and_weights_load_stops_the_run_killed_not_the_process(tmp_path, monkeypatch):
    """Data and weights load before the tracker run opens; a SIGTERM then must still be the run's handler's
    (seen at the first step boundary), not Python's default, which would end the process on the spot and
    leave a pipeline's parent run RUNNING."""
    from rlhf_exp.stages.sft import SFTTrainer

    real = SFTTrainer.setup_data_and_model

    def sigterm_while_loading(self):
        os.kill(os.getpid(), signal.SIGTERM)
        real(self)

    monkeypatch.setattr(SFTTrainer, "setup_data_and_model", sigterm_while_loading)
    with pytest.raises(stopping.RunStopped) as stopped:
        run(tiny_config(tmp_path, *RUN))
    assert stopped.value.step == 0 and stopped.value.exit_code == 143
    _, [killed] = mlflow_runs(tmp_path / "mlflow.db")
    assert killed.info.status == "KILLED" and killed.data.tags["stopped_by"] == "SIGTERM"
