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
import tempfile
from pathlib import Path

import torch

from rlhf_exp.config import compose_config
from rlhf_exp.factory import build
from rlhf_exp.models import load_causal_lm
from rlhf_exp.stages.online import OnlineRLTrainer
from rlhf_exp.tracking import Tracker


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
    cfg = compose_config(["stage=grpo", "data=tldr", "reward=reward_model", f"reward.fn.path={args.rm}",
                          f"stage.eval_examples={args.prompts}", *args.overrides])
    trainer = OnlineRLTrainer(cfg, Tracker(), tempfile.mkdtemp())
    trainer.prepare_data("sft")
    trainer.reward_fn = build(cfg.reward.fn, "reward.fn")
    prompt_ids = [x.prompt_ids for x in trainer.val_set]
    prompts = [ex.prompt for ex in trainer.val_examples]
    results = {}
    for folder in args.policies.split(","):
        cfg.model.init_from = folder
        trainer.model = load_causal_lm(cfg.model, cfg.paths.cache_dir, trainer.tokenizer).to(trainer.device).eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            responses = trainer.sample(prompt_ids, 1)
        rewards, raw, has_eos, texts = trainer.score(prompts, responses)
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
