"""Does a static KV cache, or torch.compile of the decode step, pay on this machine? The benchmark's rollout shape
(8 rows, 192 prompt tokens, 48 new, greedy) on the embedded SmolLM2, per-token times of each way.

    python -m rlhf_exp.bench.decode_cache [--compile] [--out bench/results/decode_cache.md]

The built-in sampler (rollout/generation.py) uses transformers' dynamic cache, eagerly: it drops stopped rows
from the batch, which a compiled step would pay for with a recompile per batch size (or dynamic shapes).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

ROWS, PROMPT, NEW = 8, 192, 48


def per_token_ms(model, make_cache, forward) -> tuple[float, float]:
    """(the slowest token's ms, which holds any compilation; the median token's ms)."""
    import torch

    from rlhf_exp.rollout.generation import cache_keyword

    keyword = cache_keyword(model)
    ids = torch.randint(100, 20000, (ROWS, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = make_cache()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, cache_position=torch.arange(PROMPT),
                    **{keyword: cache})
        token, times = out.logits[:, -1].argmax(-1, keepdim=True), []
        for t in range(NEW):
            start = time.perf_counter()
            position = PROMPT + t
            logits = forward(input_ids=token, use_cache=True, logits_to_keep=1, **{keyword: cache},
                             cache_position=torch.tensor([position]),
                             position_ids=torch.full((ROWS, 1), position)).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - start)
    times.sort()
    return times[-1] * 1000, times[len(times) // 2] * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="also torch.compile the step (minutes on 2 cores)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/decode_cache.md"))
    args = parser.parse_args(argv)

    import torch
    from transformers import DynamicCache, StaticCache

    from rlhf_exp.config import compose_config
    from rlhf_exp.models import load_causal_lm
    from rlhf_exp.models.loading import load_tokenizer

    cfg = compose_config([])
    torch.set_num_threads(int(cfg.hardware.num_threads or torch.get_num_threads()))
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    model = load_causal_lm(cfg.model, cfg.paths.cache_dir, tokenizer).eval()

    def static():
        return StaticCache(config=model.config, max_batch_size=ROWS, max_cache_len=PROMPT + NEW + 1,
                           dtype=next(model.parameters()).dtype)

    ways = [("dynamic cache, eager (the built-in sampler)", lambda: DynamicCache(config=model.config), model),
            ("static cache, eager", static, model)]
    if args.compile:
        compiled = torch.compile(model.forward, dynamic=False)
        ways += [("static cache, compiled: first run", static, compiled),
                 ("static cache, compiled: second run", static, compiled)]
    lines = [f"# Decode: {ROWS} rows, {PROMPT} prompt + {NEW} new tokens, {cfg.model.name}, "
             f"{next(model.parameters()).dtype}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}",
             "", "| way | median ms / token | slowest token ms (holds compilation) |", "|---|---|---|"]
    for name, make_cache, forward in ways:
        slowest, median = per_token_ms(model, make_cache, forward)
        lines.append(f"| {name} | {median:.1f} | {slowest:.0f} |")
        print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
