"""hardware.rollout_backend=vllm: GRPO and PPO rollouts from vLLM colocated with the trainer.

One vLLM engine lives in the training process on the same GPU (TRL's `vllm_mode="colocate"`, OpenRLHF's and
verl's hybrid engine), holding `hardware.vllm_gpu_memory_utilization` of the GPU for its weights and KV cache.
It starts from the policy as it is at the first rollout (written once to `<run>/vllm_model`), and the policy's
weights are copied into it before any rollout that follows an update (LoRA: merged out of place, tensor by
tensor). The log-probs the losses use are still the trainer's own: vLLM only proposes the tokens.

Each request's seed is drawn from the run's rollout generator, so a run's rollouts depend on its seed, as
with the built-in sampler (not bit-for-bit the same tokens: different kernels, different sampler).

vLLM is not a dependency (`pip install vllm` on a CUDA machine); where it or a GPU is missing the run
stops before loading any weights, saying so.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import socket
from pathlib import Path
from typing import Iterator, Sequence

import torch
from omegaconf import DictConfig

from rlhf_exp.errors import ConfigError
from rlhf_exp.models.peft import is_peft, merged_weights
from rlhf_exp.rollout.generation import truncate_after_stop

log = logging.getLogger(__name__)


# vLLM releases this code is written for: the first that runs with transformers 5, and the newest whose API
# (LLM(..., enable_sleep_mode, distributed_executor_backend="external_launcher"), sleep / wake_up, the driver
# worker's model_runner.model.load_weights, reset_prefix_cache) the calls below match, as TRL 1.16's colocated
# engine makes the same calls up to it. Newer releases run with a warning; none has run under this project's tests.
VLLM_VERSIONS = ("0.19.1", "0.31.0")


def installed_vllm_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vllm")
    except PackageNotFoundError:
        return None


def vllm_version_problem(installed: str | None) -> str | None:
    """Why the installed vLLM cannot run here (older than VLLM_VERSIONS' first), or None; a newer release than the
    window's last is warned about."""
    if installed is None:
        return None
    from packaging.version import Version

    low, high = VLLM_VERSIONS
    release = Version(Version(installed).base_version)  # "0.24.0+cu129" is 0.24.0
    if release < Version(low):
        return f"vllm {installed} is older than {low}, the first release that runs with transformers 5 (pip install 'vllm>={low}')"
    if release > Version(high):
        log.warning("vllm %s is newer than %s, the newest release whose API this project's vLLM calls were checked "
                    "against; if a rollout fails, pip install 'vllm<=%s'", installed, high, high)
    return None


def require_vllm(hardware: DictConfig, world_size: int) -> None:
    """Stop a run that asks for vLLM rollouts where they cannot run, naming every reason."""
    if hardware.rollout_backend != "vllm":
        return
    reasons = []
    if not str(hardware.device).startswith("cuda"):
        reasons.append(f"hardware.device is {hardware.device} (vLLM runs on CUDA GPUs)")
    elif not torch.cuda.is_available():
        reasons.append("no CUDA GPU is visible to torch")
    if importlib.util.find_spec("vllm") is None:
        reasons.append("the vllm package is not installed (pip install vllm, on a CUDA machine)")
    else:
        problem = vllm_version_problem(installed_vllm_version())
        if problem:
            reasons.append(problem)
    if hardware.load_in_4bit:
        reasons.append("hardware.load_in_4bit: the 4-bit base cannot be copied into vLLM after each update")
    if world_size > 1:
        reasons.append(f"{world_size} processes: the colocated engine is built for one")
    if reasons:
        raise ConfigError("hardware.rollout_backend", f"vllm cannot run here: {'; '.join(reasons)}. "
                          "Use hardware.rollout_backend=hf (the built-in sampler).")


def vllm_weights(model: torch.nn.Module, device: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight under the names of the plain Hugging Face model vLLM loaded: a PeftModel's
    adapters merged out of place, one layer at a time (`models.peft.merged_weights`; the policy, whose base is
    also the KL reference, is never written)."""
    if is_peft(model):
        yield from merged_weights(model, device)
        return
    for name, param in model.named_parameters():
        yield name, param.data if device is None else param.data.to(device)


def with_stop_token(token_ids: Sequence[int], finish_reason: str | None, stop_reason) -> list[int]:
    """A completion's tokens ending with the stop token that ended it (vLLM reports it in `stop_reason`)."""
    token_ids = list(token_ids)
    if finish_reason == "stop" and isinstance(stop_reason, int) and (not token_ids or token_ids[-1] != stop_reason):
        token_ids.append(stop_reason)
    return token_ids


def _set_launcher_environment() -> None:
    """vLLM's external_launcher joins the process group torch.distributed would: one process here."""
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(name, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])


class VLLMRollouts:
    """Samples for the policy from a colocated vLLM engine, keeping the engine's weights the policy's.

    With `hardware.vllm_sleep_mode` the engine sleeps between rollouts (vLLM's level 2: weights and KV cache
    released, so the update has the GPU) and its weights are copied in again before the next one. `close()`
    tears the engine down, so a later run in the same process can start its own."""

    def __init__(self, hardware: DictConfig, folder: Path, max_model_len: int, seed: int, precision: str):
        self.hardware, self.folder, self.max_model_len, self.seed = hardware, Path(folder), max_model_len, seed
        # the engine computes in the run's precision, whatever the trained weights are kept in (fp32 masters)
        self.dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]
        self.sleep_mode = bool(hardware.get("vllm_sleep_mode"))
        self.llm = None
        self.synced_at: int | None = None  # the trainer step whose weights the engine holds (None: none held)

    def _start(self, policy: torch.nn.Module, tokenizer) -> None:
        from vllm import LLM

        base = policy.get_base_model() if is_peft(policy) else policy
        # vLLM reads a Hugging Face folder: the policy as it is now, gathered on the host, not a second GPU copy
        base.save_pretrained(self.folder, state_dict=dict(vllm_weights(policy, "cpu")), safe_serialization=True)
        tokenizer.save_pretrained(self.folder)
        _set_launcher_environment()
        self.llm = LLM(model=str(self.folder), gpu_memory_utilization=float(self.hardware.vllm_gpu_memory_utilization),
                       max_model_len=self.max_model_len, dtype=self.dtype, enable_sleep_mode=self.sleep_mode,
                       seed=self.seed, enable_prefix_caching=True, distributed_executor_backend="external_launcher",
                       max_num_batched_tokens=max(4096, self.max_model_len))

    @torch.no_grad()
    def sync(self, policy: torch.nn.Module, tokenizer, step: int) -> None:
        """The engine's weights made the policy's at `step` (starting the engine on the first call)."""
        if self.llm is None:
            self._start(policy, tokenizer)
        elif self.synced_at != step:
            if self.sleep_mode:
                self.llm.wake_up(tags=["weights"])  # load_weights writes into mapped memory only
            engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
            for name, tensor in vllm_weights(policy):
                engine_model.load_weights([(name, tensor)])
            self.llm.reset_prefix_cache()  # cached prompt blocks hold the old weights' keys and values
        self.synced_at = step

    def generate(self, prompts: Sequence[Sequence[int]], samples: int, policy: torch.nn.Module, tokenizer,
                 step: int, generation, stop_token_ids: Sequence[int], generator: torch.Generator) -> list[list[int]]:
        """`samples` responses per prompt (a prompt's adjacent) from `policy` as it is at trainer `step`,
        each ending at its first stop token if any. Every prompt is a request with a seed of its own, drawn
        from `generator`: one seed for a whole call gave two equal prompts the same samples."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.sync(policy, tokenizer, step)
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator, device=generator.device).tolist()
        params = [SamplingParams(n=samples, temperature=float(generation.temperature),
                                 top_k=int(generation.top_k) or -1, top_p=float(generation.top_p),
                                 max_tokens=int(generation.max_new_tokens), stop_token_ids=list(stop_token_ids),
                                 seed=int(seed), detokenize=False) for seed in seeds]
        if self.sleep_mode:
            self.llm.wake_up(tags=["kv_cache"])
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        if self.sleep_mode:
            self.llm.sleep(level=2)  # weights and KV cache released: the next rollout copies the weights in again
            self.synced_at = None
        return [truncate_after_stop(with_stop_token(c.token_ids, c.finish_reason, c.stop_reason), stop_token_ids)[0]
                for out in outputs for c in out.outputs]

    def close(self) -> None:
        """The engine torn down and its GPU memory returned: a later run in this process starts its own."""
        if self.llm is None:
            return
        self.llm, self.synced_at = None, None
        try:
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
        except ImportError:  # a vLLM without these helpers (or a stand-in)
            pass
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
