"""What sampling from a compute-dtype copy of fp32 master weights saves (OnlineRLTrainer.sampling_policy): the
benchmark's rollout shape on the embedded SmolLM2 under bf16 autocast, decoded from the fp32 policy itself
(autocast casts every weight at every decode step) and from its bf16 copy, with the weight casts counted.

    python -m rlhf_exp.bench.sampling_copy [--rows 8] [--prompt 192] [--new 16] [--out bench/results/sampling_copy.md]

On a CPU without native bf16 the matmuls themselves are emulated and dominate; the casts are what a GPU (or an
AVX512-BF16 CPU) pays on top of fast bf16 matmuls.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    import torch

    from rlhf_exp.config import compose_config
    from rlhf_exp.models import load_causal_lm, load_tokenizer
    from rlhf_exp.rollout.generation import generate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=192)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("bench/results/sampling_copy.md"))
    args = parser.parse_args(argv)

    cfg = compose_config(["model=smollm2_135m", "model.dtype=float32"])
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    policy = load_causal_lm(cfg.model, cfg.paths.cache_dir, tokenizer).eval()  # fp32 master weights
    kept = copy.deepcopy(policy).to(torch.bfloat16)
    prompts = torch.randint(100, 20000, (args.rows, args.prompt), generator=torch.Generator().manual_seed(0)).tolist()
    weights = sum(1 for p in policy.parameters() if p.dim() == 2)

    class Casts(torch.utils._python_dispatch.TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32 \
                    and kwargs.get("dtype") == torch.bfloat16 and args[0].dim() == 2 and args[0].numel() >= 576 * 576:
                Casts.count += 1
            return func(*args, **kwargs)

    rows = []
    for name, model in (("fp32 policy under bf16 autocast", policy), ("bf16 copy", kept)):
        def run():
            return generate(model, prompts, repeats=1, pad_token_id=tokenizer.pad_token_id,
                            stop_token_ids=[], max_new_tokens=args.new, temperature=1.0, top_k=0, top_p=1.0,
                            generator=torch.Generator().manual_seed(1),
                            autocast=torch.autocast("cpu", dtype=torch.bfloat16))
        run()  # warm-up
        Casts.count = 0
        start = time.perf_counter()
        with Casts():
            run()
        seconds = time.perf_counter() - start
        rows.append((name, seconds, Casts.count))
    lines = [f"# Sampling from a bf16 copy of fp32 master weights ({platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads)", "",
             f"SmolLM2-135M, {args.rows} rows x {args.prompt} prompt tokens, {args.new} new tokens, bf16 autocast; "
             f"{weights} weight matrices. `python -m rlhf_exp.bench.sampling_copy`", "",
             "| decoded from | s | weight casts (>= 576x576) |", "|---|---:|---:|"]
    lines += [f"| {name} | {seconds:.2f} | {casts} |" for name, seconds, casts in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
