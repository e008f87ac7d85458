"""Device, precision, threads and random streams: what the `hardware` group decides, in one place."""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from rlhf_exp.errors import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError("model.dtype", f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


# ------------------------------------------------------------------ precision


@functools.cache
def bf16_matmul_is_faster() -> bool:
    """A short measured probe (~0.2 s) for CPUs whose bf16 support flags torch cannot read (non-x86)."""
    def seconds(dtype: torch.dtype) -> float:
        a, b = torch.randn(256, 256, dtype=dtype), torch.randn(256, 256, dtype=dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        return best

    return seconds(torch.bfloat16) < 0.9 * seconds(torch.float32)


def choose_precision(requested: str, device: str) -> tuple[str, str]:
    """(fp32 | bf16 | fp16, why) for `hardware.precision`; "auto" picks what the machine runs fastest.

    CPU: bf16 autocast only where matmuls are native in bf16 (AVX512-BF16 or AMX); on an AVX2-only CPU
    torch emulates them about 100x slower than fp32 (measured on an EPYC: 0.9 vs 126 GFLOP/s).
    GPU: bf16 where supported (Ampere and later), else fp16 with a gradient scaler (V100, T4).
    """
    if requested != "auto":
        return requested, "set by hardware.precision"
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():  # planning for a GPU profile on a machine without one
            return "bf16", "no GPU visible: planned for the profile's GPU (bf16)"
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported():
            return "bf16", f"{name} supports bf16"
        return "fp16", f"{name} has no bf16: fp16 autocast with a gradient scaler"
    if torch.cpu._is_amx_tile_supported():
        return "bf16", "the CPU has AMX tiles (native bf16 matmuls)"
    if torch.cpu._is_avx512_bf16_supported():
        return "bf16", "the CPU has AVX512-BF16 (native bf16 matmuls)"
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
        return "fp32", "the CPU has neither AVX512-BF16 nor AMX: bf16 matmuls would be emulated (~100x slower)"
    if bf16_matmul_is_faster():
        return "bf16", f"a {platform.machine()} CPU where a measured bf16 matmul beat fp32"
    return "fp32", f"a {platform.machine()} CPU where a measured bf16 matmul did not beat fp32"


@dataclass
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16

    def autocast(self):
        """Mixed precision for forward passes; trained weights stay fp32 (hardware.master_weights)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        return DTYPES[self.precision]


def check_device(hardware: DictConfig) -> torch.device:
    device = torch.device(hardware.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("hardware", f"hardware={hardware.name} needs a CUDA GPU and none is visible; use hardware=cpu")
    return device


def allow_tf32(device: torch.device) -> bool:
    """TF32 for the fp32 matmuls of a GPU of compute capability 8.0 or later (Ampere, Ada, Hopper, Blackwell):
    the fp32 LM head and value heads, fp32 runs; torch leaves it off for matmuls. Nothing changes on a CPU
    (there "high" may let oneDNN run fp32 matmuls in bf16) or an older GPU."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return True


def make_runtime(hardware: DictConfig) -> Runtime:
    device = check_device(hardware)
    if hardware.get("num_threads"):
        torch.set_num_threads(int(hardware.num_threads))
    if allow_tf32(device):
        log.info("TF32 on for fp32 matmuls (compute capability %d.%d)", *torch.cuda.get_device_capability(device))
    return Runtime(device=device, precision=choose_precision(hardware.precision, str(hardware.device))[0])


# ------------------------------------------------------------------ randomness


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global random stream, as tensors and plain values (what torch.load(weights_only=True) reads)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), position, has_gauss,
                         cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RandomStreams:
    """The run's own generators, on its device, apart from torch's global streams.

    `rollout` draws the training samples (on the device) and `shuffle` the minibatch orders (on the CPU);
    both are checkpointed. `fresh(offset)` is a new generator for one evaluation, seeded the same way
    every time. Dropout draws from torch's global streams, which evaluation no longer touches: how often
    a run evaluates cannot change its training.
    """

    def __init__(self, seed: int, device: torch.device):
        self.seed, self.device = seed, device
        self.rollout = torch.Generator(device=device).manual_seed(seed)
        self.shuffle = torch.Generator().manual_seed(seed + 2**20)

    def fresh(self, offset: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed + offset)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"rollout": self.rollout.get_state(), "shuffle": self.shuffle.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.rollout.set_state(state["rollout"])
        self.shuffle.set_state(state["shuffle"])
