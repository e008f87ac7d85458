"""Paired comparison of policies on the same held-out prompts: now a call of `stage=eval`.

python experiments/compare_policies.py --rm <rm checkpoint> --policies <sft>,<grpo> --prompts 128 [overrides ...]

runs (and prints) the equivalent

python -m rlhf_exp stage=eval "stage.policies={p0: <sft>, p1: <grpo>}" stage.baseline=p0 stage.kl_reference=p0 \
    stage.judge=<rm> stage.eval_examples=128 [overrides ...]

The first policy is the baseline; the reward model is the judge. What the stage reports (win rates with
intervals, length-controlled win rate, KL, length, EOS rate, ROUGE-L, distinct-n, a side-by-side table):
rlhf_exp/stages/eval.py. (The write-up in grpo_rm_tldr/ used this script's earlier, stand-alone version.)
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys


def eval_command(rm: str, policies: list[str], prompts: int, overrides: list[str]) -> list[str]:
    named = ", ".join(f"p{i}: '{folder}'" for i, folder in enumerate(policies))
    return [sys.executable, "-m", "rlhf_exp", "stage=eval", f"stage.policies={{{named}}}", "stage.baseline=p0",
            "stage.kl_reference=p0", f"stage.judge={rm}", f"stage.eval_examples={prompts}", *overrides]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rm", required=True)
    parser.add_argument("--policies", required=True, help="comma-separated checkpoint folders; the first is the baseline")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    command = eval_command(args.rm, args.policies.split(","), args.prompts, args.overrides)
    print(shlex.join(command[1:]).replace(sys.executable, "python"), flush=True)
    sys.exit(subprocess.call(command))


if __name__ == "__main__":
    main()
