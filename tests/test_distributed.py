"""Two CPU processes under torchrun (gloo): replicas stay identical and match one process with the
same global batch (SFT and DPO on the tiny model)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, mlflow_runs, tracked_env
from test_rm_dpo import PAIRS

ROOT = Path(__file__).resolve().parent.parent
STAGES = {
    "sft": ["stage=sft", "hardware.micro_batch_size.sft=1"],
    "dpo": ["stage=dpo", *PAIRS, "stage.eval_examples=8", "hardware.micro_batch_size.dpo=1"],
}


def launch(tmp_path: Path, nproc: int, overrides: list[str]) -> subprocess.CompletedProcess:
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    env = {**os.environ, **tracked_env(tmp_path), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*prefix, "-m", "rlhf_exp", *TINY, *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.parametrize("stage", list(STAGES))
def test_torchrun_two_cpu_processes_match_one_process(tmp_path, stage):
    common = [*STAGES[stage], "stage.batch_size=4", "stage.max_steps=3", "stage.num_samples=0", "stage.lr=1e-3"]
    results = {}
    for nproc in (2, 1):
        out = launch(tmp_path / str(nproc), nproc, common)
        assert out.returncode == 0, out.stderr[-3000:]
        client, runs = mlflow_runs(tmp_path / str(nproc) / "m.db")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # only rank 0 tracks
        results[nproc] = runs[0]
    two = results[2]
    digests = two.data.tags["dist.parameter_digests"].split(",")
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks end with identical parameters
    assert two.data.metrics["dist/replicas_identical"] == 1.0
    weights = [load_file(str(Path(r.data.tags["checkpoint_dir"]) / "model.safetensors")) for r in results.values()]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.allclose(weights[0][name], weights[1][name], atol=1e-5), name
    losses = [r.data.metrics["train/loss"] for r in results.values()]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
