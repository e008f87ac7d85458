"""`make gpu-check DRY=1`: the GPU check's script runs end to end on the CPU at small sizes, every measured check
passes, and the tests marked gpu are skipped with their reason printed (never silently)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from helpers import ROOT


def test_the_gpu_check_runs_dry_on_the_cpu_and_writes_its_reports(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rlhf_exp.gpu_check", "--dry", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    names = {"packed_against_padded", "gradient_checkpointing_with_lora", "qlora_paged_adamw_step",
             "merged_copy_over_100_syncs", "sampler_reproducibility", "held_models_against_the_plan",
             "nccl_group_of_one", "llama2_7b_qlora_step_against_the_plan"}
    assert set(report["checks"]) == names
    assert all(result["ok"] for result in report["checks"].values()), report["checks"]
    assert report["checks"]["held_models_against_the_plan"]["critic"]["built"]["linear"] == "nf4"
    if not torch.cuda.is_available():
        tests = report["gpu_tests"]
        assert tests["counts"].get("skipped", 0) >= 8 and not tests["counts"].get("passed")
        assert tests["skipped_reasons"] and all("needs a CUDA GPU" in r for r in tests["skipped_reasons"])
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "make gpu-check DRY=1" in markdown and "| nccl_group_of_one | yes |" in markdown
