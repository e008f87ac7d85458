"""Runs stopped by a signal (issue 11.3): SIGTERM / SIGINT checkpoint at a step boundary and close the
run KILLED with the resume command printed. (SIGKILL, which no handler sees: tests/test_resume.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import ROOT, TINY, mlflow_runs, run_cli, tracked_env, tiny_config
from rlhf_exp import stopping
from rlhf_exp.launch.run import run as run_stage
from rlhf_exp.stages.sft import SFTTrainer

# steps slow enough to land a signal mid-run, with a checkpoint every 2 steps to wait for
LONG = [*TINY, "stage.max_steps=400", "stage.save_every=2", "stage.eval_every=null", "stage.num_samples=0",
        "hydra.job_logging.root.level=WARNING"]


def start_cli(tmp_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rlhf_exp", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **tracked_env(tmp_path)})


def wait_for(paths_glob, root: Path, process: subprocess.Popen, timeout: float = 300) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = sorted(root.glob(paths_glob))
        if found:
            return found[0]
        if process.poll() is not None:
            raise AssertionError(f"the run ended (rc {process.returncode}) first:\n{process.stderr.read()[-3000:]}")
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"no {paths_glob} under {root} in {timeout} s")


def test_sigterm_checkpoints_closes_the_run_killed_and_prints_the_resume_command(tmp_path):
    """Before: SIGTERM ended the process (rc 143) with its MLflow run RUNNING forever and no checkpoint."""
    signum = signal.SIGTERM
    job = start_cli(tmp_path, *LONG)
    wait_for("**/checkpoints/step_000002/trainer_state.pt", tmp_path / "runs", job)
    job.send_signal(signum)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 128 + signum, err[-3000:]
    _, [run] = mlflow_runs(tmp_path / "m.db")
    assert run.info.status == "KILLED"
    stopped_at = int(run.data.tags["stopped_at_step"])
    assert 2 <= stopped_at < 400 and run.data.tags["stopped_by"] == signal.Signals(signum).name
    checkpoint = Path(run.data.tags["checkpoint_dir"])
    assert checkpoint.name == f"step_{stopped_at:06d}"
    assert torch.load(checkpoint / "trainer_state.pt", weights_only=False)["step"] == stopped_at
    assert "Traceback" not in err
    command = err.split("resume with:\n", 1)[1].strip().splitlines()[0]
    assert command.startswith("python -m rlhf_exp model=tiny") and command.endswith(f"stage.resume_from={checkpoint}")
    # the printed command, as typed (fewer steps, so it ends soon), continues from that step
    args = command.split()[3:]
    resumed = run_cli(*[a for a in args if not a.startswith("stage.max_steps=")], f"stage.max_steps={stopped_at + 2}",
                      env=tracked_env(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client, [continued] = mlflow_runs(tmp_path / "m.db")  # the same MLflow run goes on (issue 11.5)
    assert continued.info.run_id == run.info.run_id and continued.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == list(range(1, stopped_at + 3))  # its history continues at the resumed step, once each
    assert continued.data.tags["resumed_from"] == str(checkpoint) and continued.data.tags["resume_count"] == "1"
    assert continued.data.tags["resumed.stage.max_steps"] == str(stopped_at + 2)  # MLflow params cannot change
    # the FINISHED run no longer says it was stopped: the stop is in its history
    assert "stopped_by" not in continued.data.tags and "stopped_at_step" not in continued.data.tags
    assert continued.data.tags["stop_history"] == f"SIGTERM at step {stopped_at}"


def test_sigint_stops_an_in_process_run_at_a_step_boundary_and_a_second_one_at_once(tmp_path, monkeypatch):
    """Ctrl-C: the same stop as SIGTERM (checkpoint, KILLED, exit 130); pressed again, KeyboardInterrupt now.
    Before: the first Ctrl-C raised KeyboardInterrupt mid-step, with nothing saved past the last checkpoint."""
    step = SFTTrainer.train_step

    def train_step_then_ctrl_c(self):
        metrics = step(self)
        if self.step == 1:  # during step 2: the signal lands mid-step
            os.kill(os.getpid(), signal.SIGINT)
        return metrics

    monkeypatch.setattr(SFTTrainer, "train_step", train_step_then_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(stopping.RunStopped) as stopped:
        run_stage(tiny_config(tmp_path, "stage.max_steps=6", "stage.num_samples=0", "stage.eval_every=null"))
    assert stopped.value.exit_code == 130 and stopped.value.step == 2
    _, [killed] = mlflow_runs(tmp_path / "mlflow.db")
    assert killed.info.status == "KILLED" and killed.data.tags["stopped_by"] == "SIGINT"
    assert Path(killed.data.tags["checkpoint_dir"]).name == "step_000002"
    assert torch.load(Path(killed.data.tags["checkpoint_dir"]) / "trainer_state.pt", weights_only=True)["step"] == 2
    assert signal.getsignal(signal.SIGINT) is handler  # Python's own handler is back after the run

    with stopping.stop_at_step_boundary():
        os.kill(os.getpid(), signal.SIGINT)
        assert stopping.received() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
