"""Work per step in matmul FLOPs, and the machine's matmul peak, to say how close a step runs to the limit.

Counted as the least work the step needs, the same for both sides (Kaplan et al. 2020's 2N per token
forward, 4N backward): the decoder body on every token, a prompt once however many responses follow it
(GRPO's samples, a pair's chosen and rejected), the LM head only where a log-prob is used (response
tokens), attention's score and value products over the causal half of prompt + response. A side that
runs the LM head over prompt tokens, or a prompt once per response, does more work than counted and
shows a lower fraction.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    body_params: int    # matmul weights of the decoder layers
    head_params: int    # the LM head (vocab x hidden)

    @classmethod
    def of(cls, model_folder: str | Path) -> "Shape":
        config = json.loads((Path(model_folder) / "config.json").read_text())
        hidden, layers = config["hidden_size"], config["num_hidden_layers"]
        heads = config["num_attention_heads"]
        kv = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        attention = 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim  # q, o; k, v
        mlp = 3 * hidden * config["intermediate_size"]  # gate, up, down
        return cls(hidden, layers, layers * (attention + mlp), config["vocab_size"] * hidden)


def forward_flops(shape: Shape, tokens: float, head_tokens: float, sequence: float) -> float:
    """One forward over `tokens` tokens in sequences of `sequence` tokens, the LM head on `head_tokens`."""
    attention = 2 * shape.layers * shape.hidden * sequence * tokens  # QK^T and AV, causal: half of 4·L·H·T
    return 2 * shape.body_params * tokens + 2 * shape.head_params * head_tokens + attention


@dataclass(frozen=True)
class StepWork:
    """Mean tokens per example of a stage's data (the EOS each side appends counted)."""
    prompt: float
    response: float          # SFT: the completion; RM / DPO: chosen and rejected averaged


def step_flops(stage: str, shape: Shape, work: StepWork, batch: int, group: int = 1,
               generated: float = 0.0) -> float:
    """FLOPs of one optimizer step. sft: `batch` sequences; rm / dpo: `batch` pairs; grpo: `batch` prompts x
    `group` samples, `generated` tokens sampled in all (its mean response length follows from them)."""
    sequence = work.prompt + work.response
    if stage == "sft":
        return 3 * forward_flops(shape, batch * sequence, batch * work.response, sequence)
    pair_tokens = batch * (work.prompt + 2 * work.response)  # the prompt once, chosen and rejected behind it
    if stage == "rm":  # a scalar head: no LM head
        return 3 * forward_flops(shape, pair_tokens, 0, sequence)
    if stage == "dpo":  # policy forward + backward, the reference forward
        return 4 * forward_flops(shape, pair_tokens, 2 * batch * work.response, sequence)
    response = generated / (batch * group)
    tokens = batch * work.prompt + generated  # each prompt once, its samples behind it
    sampling = forward_flops(shape, tokens, generated, work.prompt + response)
    return sampling + 4 * forward_flops(shape, tokens, generated, work.prompt + response)  # reference + policy


def matmul_peak(dtype: str, size: int = 2048, repeats: int = 8) -> float:
    """The best FLOP/s of a size^3 matmul in `dtype` (fp32 | bf16) with this process's threads."""
    import torch

    kind = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(size, size, dtype=kind), torch.randn(size, size, dtype=kind)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best
