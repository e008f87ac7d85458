"""Paired comparison of policies under a reward model on the same held-out prompts.

python experiments/compare_policies.py --rm <rm checkpoint> --policies <sft>,<grpo> --prompts 128 \
    [--out results.json] [config overrides ...]

Every policy samples one response per held-out prompt (the run's data split and generation
settings, one fixed seed), the reward model scores them, and the policies are compared with
the first one prompt by prompt: mean score difference with a 95% interval, win rate, length
and EOS rate. Responses that did not end within max_new_tokens are reported both ways (as
scored, and with the no-EOS score the RL runs trained against).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from rlhf_exp.config import compose_config, resolved
from rlhf_exp.data import load_sft_splits
from rlhf_exp.data.formats import FORMATS
from rlhf_exp.data.tokens import encode_prompt, stop_token_ids
from rlhf_exp.factory import build
from rlhf_exp.models import load_causal_lm, load_tokenizer
from rlhf_exp.rewards import score_responses
from rlhf_exp.rollout import sample
from rlhf_exp.runtime import make_runtime


def paired(diff: torch.Tensor) -> tuple[float, float, float]:
    """(mean, low, high): a normal 95% interval of the mean of paired differences."""
    mean = float(diff.mean())
    half = 1.96 * float(diff.std()) / math.sqrt(len(diff))
    return mean, mean - half, mean + half


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rm", required=True)
    parser.add_argument("--policies", required=True, help="comma-separated checkpoint folders; the first is the baseline")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = resolved(compose_config(["stage=grpo", "data=tldr", "reward=reward_model", f"reward.fn.path={args.rm}",
                                   *args.overrides]))
    runtime = make_runtime(cfg.hardware)
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    _, held_out = load_sft_splits(cfg.data, tokenizer, cfg.seed)
    held_out = held_out[: args.prompts]
    prompt_ids = [encode_prompt(ex.prompt, tokenizer, cfg.data.max_prompt_tokens) for ex in held_out]
    prompts = [ex.prompt for ex in held_out]
    stops = stop_token_ids(tokenizer, FORMATS[cfg.data.format].chat)
    reward_fn = build(cfg.reward.fn, "reward.fn")
    results = {}
    for folder in args.policies.split(","):
        cfg.model.init_from = folder
        model = load_causal_lm(cfg.model, cfg.paths.cache_dir, tokenizer).to(runtime.device).eval()
        # the same draws for every policy: a generator of its own, seeded the same way
        generator = torch.Generator(device=runtime.device).manual_seed(cfg.seed + 1)
        responses = sample(model, prompt_ids, 1, cfg.stage.generation, pad_token_id=tokenizer.pad_token_id,
                           stop_token_ids=stops, generator=generator, autocast=runtime.autocast())
        rewards, raw, has_eos, texts = score_responses(reward_fn, tokenizer, prompts, responses, stops,
                                                       cfg.reward.missing_eos_score)
        results[folder] = {"score": raw, "reward": rewards, "eos": torch.tensor(has_eos, dtype=torch.float32),
                           "length": torch.tensor([len(r) for r in responses], dtype=torch.float32), "texts": texts}
    base_name, base = next(iter(results.items()))
    report = {"prompts": len(prompts), "baseline": base_name, "policies": {}}
    for name, res in results.items():
        row = {"score_mean": float(res["score"].mean()), "reward_mean": float(res["reward"].mean()),
               "eos_rate": float(res["eos"].mean()), "length_mean": float(res["length"].mean())}
        ended = res["eos"].bool()
        row["score_mean_of_ended"] = float(res["score"][ended].mean()) if ended.any() else float("nan")
        if name != base_name:
            row["score_minus_baseline"] = paired(res["score"] - base["score"])
            row["reward_minus_baseline"] = paired(res["reward"] - base["reward"])
            row["win_rate_by_score"] = float((res["score"] > base["score"]).float().mean())
            both = ended & base["eos"].bool()
            row["score_minus_baseline_both_ended"] = paired(res["score"][both] - base["score"][both]) \
                if both.sum() > 1 else None
            row["prompts_both_ended"] = int(both.sum())
        report["policies"][name] = row
    report["samples"] = [{"prompt": prompts[i][-400:], **{name: {"text": res["texts"][i], "score": float(res["score"][i])}
                                                          for name, res in results.items()}} for i in range(3)]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
