"""Under a memory limit (a container's cgroup, `ulimit -v`) the planner budgets the limit, not the machine's
RAM, and an allocation that fails is one line with the plan's figures, not an allocator traceback."""

from __future__ import annotations

import resource

import pytest
import torch

from helpers import mlflow_runs, tiny_config
from rlhf_exp.app import run
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
