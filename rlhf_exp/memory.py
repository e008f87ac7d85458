"""Measured peak memory of a run (models + training, from after data loading), beside the planner's figure."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

import torch

log = logging.getLogger(__name__)


def _proc_status_bytes(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return float(line.split()[1]) * 1024
    return float("nan")


def _malloc_trim() -> None:
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc only
        libc.malloc_trim(0)


def reset_peak_memory(device: torch.device) -> float:
    """Start a new peak-memory window; returns the memory in use now (bytes).

    CUDA: allocated tensor memory. CPU (Linux): resident set size; writing 5 to
    /proc/self/clear_refs resets the kernel's high-water mark (VmHWM). Freed memory
    glibc still holds (data loading's) is handed back first: otherwise later tensors
    reuse it unseen, and how much depends on the thread count (one heap per thread).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return float(torch.cuda.memory_allocated(device))
    gc.collect()
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return _proc_status_bytes("VmRSS")
    except OSError:  # not Linux
        return float("nan")


def peak_memory(device: torch.device) -> float:
    """Peak memory (bytes) since the last `reset_peak_memory`."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    try:
        return _proc_status_bytes("VmHWM")
    except OSError:
        return float("nan")


class PeakMemory:
    """`start()` after the data is loaded; `report()` at the end: measured peak and the plan, in GiB."""

    def __init__(self, device: torch.device, plan=None):
        """`plan`: the run's planner.Plan (the launcher makes it once), or None for no planned figures."""
        self.device, self.plan, self.baseline = device, plan, float("nan")

    def start(self) -> None:
        self.baseline = reset_peak_memory(self.device)

    def report(self) -> tuple[dict[str, float], str | None]:
        """(metrics, the plan's table or None)."""
        peak = peak_memory(self.device)
        metrics = {"memory/peak_gib": peak / 2**30, "memory/baseline_gib": self.baseline / 2**30,
                   "memory/peak_over_baseline_gib": (peak - self.baseline) / 2**30}
        if self.plan is None:
            return metrics, None
        metrics.update({"memory/planned_gib": self.plan.total_gib, "memory/planned_tensors_gib": self.plan.tensors_gib})
        return metrics, self.plan.table()
