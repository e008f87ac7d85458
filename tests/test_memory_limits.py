"""Under a memory limit (a container's cgroup, `ulimit -v`) the planner budgets the limit, not the machine's
RAM, and an allocation that fails is one line with the plan's figures, not an allocator traceback."""

from __future__ import annotations

import resource

import pytest
import torch

from helpers import mlflow_runs, tiny_config
from rlhf_exp.launch.run import run
from rlhf_exp.errors import OutOfMemory, ReportedError
from rlhf_exp.planner import GIB, cpu_memory_limit


def test_the_cgroups_memory_limit_is_what_a_cpu_run_plans_against(tmp_path):
    """Before: the planner budgeted the machine's RAM inside a 64 MiB container."""
    (tmp_path / "memory.max").write_text(f"{64 * 2**20}\n")
    assert cpu_memory_limit(tmp_path) == (64 * 2**20, f"the cgroup's limit ({tmp_path / 'memory.max'})")
    (tmp_path / "memory.max").write_text("max\n")  # no limit set
    assert cpu_memory_limit(tmp_path)[1] in ("the machine's RAM", "the address-space limit (ulimit -v)")
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(32 * 2**20))
    assert cpu_memory_limit(v1)[0] == 32 * 2**20


def test_ulimit_v_is_what_a_cpu_run_plans_against(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = 48 * 2**20 if soft == resource.RLIM_INFINITY else min(soft, 48 * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        found = cpu_memory_limit(tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert found == (limit, "the address-space limit (ulimit -v)")


def test_a_failed_allocation_is_one_line_with_the_plans_figures(tmp_path, monkeypatch):
    """Before: `RuntimeError: [enforce fail at alloc_cpu.cpp] ... DefaultCPUAllocator: can't allocate memory`
    and its traceback. The allocation here is real: a petabyte no allocator grants."""
    from rlhf_exp.stages.sft import SFTTrainer

    monkeypatch.setattr(SFTTrainer, "train_step", lambda self: torch.empty(10**15, dtype=torch.uint8))
    with pytest.raises(OutOfMemory) as failed:
        run(tiny_config(tmp_path, "stage.max_steps=2", "stage.num_samples=0", "stage.eval_every=null"))
    message = str(failed.value)
    assert isinstance(failed.value, ReportedError) and "\n" not in message
    assert message.startswith("out of memory on cpu (") and "you tried to allocate 1000000000000000 bytes" in message
    assert f"GiB of {cpu_memory_limit()[0] / GIB:.2f} GiB available (cpu: " in message and "; try " in message
    _, [failed_run] = mlflow_runs(tmp_path / "mlflow.db")
    assert failed_run.info.status == "FAILED"


def test_the_plan_is_made_again_at_the_longest_prompt_the_data_holds(tmp_path, caplog):
    """Before: only the configured caps were planned (data.max_prompt_tokens), and a run launched with
    hardware.check_memory_plan=false grew past the machine with no word from the planner."""
    import logging

    from helpers import GRPO

    with caplog.at_level(logging.INFO, logger="rlhf_exp.launch.run"):
        run(tiny_config(tmp_path / "grpo", *GRPO, "stage.max_steps=1", "stage.minibatch_size=8"))
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory plan at the data's")]
    assert len(said) == 1 and "tokens; data.max_prompt_tokens=48): " in said[0] and "response" not in said[0]
    prompt = int(said[0].split("longest prompt (")[1].split(" tokens")[0])
    assert 0 < prompt <= 48
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rlhf_exp.launch.run"):  # a stage that reads its responses
        run(tiny_config(tmp_path / "sft", "stage.max_steps=1", "stage.num_samples=0", "stage.eval_every=null",
                        "hardware.check_memory_plan=false", "hardware.memory_gb=0.001"))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
              and r.getMessage().startswith("at the data's longest prompt (")]
    assert len(warned) == 1 and " and response (" in warned[0]
    assert "GiB of 0.00 GiB (hardware=" in warned[0] and warned[0].endswith("expect to run out of memory")
    _, [finished] = mlflow_runs(tmp_path / "sft" / "mlflow.db")
    assert finished.info.status == "FINISHED"  # the user's hardware.check_memory_plan=false stands
