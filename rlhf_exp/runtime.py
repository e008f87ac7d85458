"""Device, precision, threads and RNG: what the `hardware` group decides, in one place."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import random
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from rlhf_exp.errors import ConfigError

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16

    def autocast(self):
        """Mixed precision for forward passes; master weights and optimizer stay as loaded."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_AUTOCAST[self.precision])


def make_runtime(hardware: DictConfig) -> Runtime:
    device = torch.device(hardware.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("hardware", f"hardware={hardware.name} needs a CUDA GPU and none is visible; use hardware=cpu")
    if hardware.get("num_threads"):
        torch.set_num_threads(int(hardware.num_threads))
    return Runtime(device=device, precision=hardware.precision)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _proc_status_bytes(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return float(line.split()[1]) * 1024
    return float("nan")


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


def _malloc_trim() -> None:
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc only
        libc.malloc_trim(0)


def peak_memory(device: torch.device) -> float:
    """Peak memory (bytes) since the last `reset_peak_memory`."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    try:
        return _proc_status_bytes("VmHWM")
    except OSError:
        return float("nan")
