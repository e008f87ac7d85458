"""Group relative policy optimization (GRPO; Shao et al. 2024, DeepSeekMath sec. 4).

One step = one rollout: `stage.batch_size` prompts x `stage.samples_per_prompt` samples from
the policy (KV cache, left padding, explicit EOS / pad, temperature / top-k / top-p), scored
by the `reward` group (a no-EOS response gets `reward.missing_eos_score` instead), advantages
normalized within each prompt's group, then `stage.updates_per_rollout` passes over the
rollout in minibatches of `stage.minibatch_size` sequences; every minibatch is an optimizer
step (the DGX Spark seed stepped once per pass after zeroing per minibatch). Loss per token:
clipped (optionally dual-clipped) surrogate + kl_coef x KL(policy || reference) (k1/k2/k3),
aggregated per `stage.loss_aggregation`.
Deviations: with one pass and one minibatch per rollout, the rollout's log-probs are the
update's own (ratio exactly 1) and no extra forward is made; otherwise the rollout is
re-scored once before the updates.
"""

from __future__ import annotations

import copy
import time

import torch

from rlhf_exp.data.collate import TokenizedSFT, collate_sft
from rlhf_exp.errors import ConfigError
from rlhf_exp.factory import build
from rlhf_exp.losses.policy import (aggregate_loss, clipped_policy_loss, group_advantages, kl_penalty,
                                    masked_mean)
from rlhf_exp.models import load_causal_lm
from rlhf_exp.ops.logprobs import response_logprobs
from rlhf_exp.rewards import score_completions
from rlhf_exp.rollout import generate
from rlhf_exp.stages.base import Trainer, chunks


class GRPOTrainer(Trainer):
    curve_metrics = ("train/reward_mean", "eval/reward_mean")

    # ------------------------------------------------------------------ setup
    def setup_data_and_model(self) -> None:
        stage = self.stage
        self.rollout_size = stage.batch_size * stage.samples_per_prompt
        if self.rollout_size % stage.minibatch_size:
            raise ConfigError("stage.minibatch_size", f"must divide the rollout: batch_size x samples_per_prompt = "
                              f"{self.rollout_size} (got {stage.minibatch_size})")
        self.prepare_data("sft")  # prompts from the data's SFT examples (the references are unused)
        self.model = load_causal_lm(self.model_cfg, self.cfg.paths.cache_dir, self.tokenizer).to(self.device)
        start = self.model if not stage.get("resume_from") else load_causal_lm(
            self.cfg.model, self.cfg.paths.cache_dir, self.tokenizer).to(self.device)
        self.reference = copy.deepcopy(start).eval().requires_grad_(False)
        self.reward_fn = build(self.cfg.reward.fn, "reward.fn")

    def total_optimizer_steps(self) -> int:
        return self.stage.max_steps * self.stage.updates_per_rollout * (self.rollout_size // self.stage.minibatch_size)

    # ------------------------------------------------------------------ rollout
    def sample(self, prompt_ids: list[list[int]], samples: int) -> list[list[int]]:
        gen = self.stage.generation
        repeated = [ids for ids in prompt_ids for _ in range(samples)]  # a prompt's samples are adjacent
        return generate(self.model, self.tokenizer, repeated, max_new_tokens=gen.max_new_tokens,
                        temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
                        autocast=self.runtime.autocast())

    def score(self, prompts: list[str], prompt_ids: list[list[int]], responses: list[list[int]]):
        eos = self.tokenizer.eos_token_id
        has_eos = [bool(r) and r[-1] == eos for r in responses]
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        rewards, raw = score_completions(self.reward_fn, prompts, texts, responses, has_eos,
                                         self.cfg.reward.missing_eos_score)
        return rewards, raw, has_eos, texts

    def logprobs(self, model, items: list[TokenizedSFT], with_entropy: bool = False):
        batch = collate_sft(items, self.tokenizer.pad_token_id)
        prompt_lengths = torch.tensor([len(x.prompt_ids) for x in items])
        response_lengths = torch.tensor([len(x.response_ids) for x in items])
        with self.runtime.autocast():
            return response_logprobs(model, batch["input_ids"].to(self.device), prompt_lengths, response_lengths,
                                     self.stage.generation.temperature, with_entropy)

    @torch.no_grad()
    def score_rollout(self, model, items: list[TokenizedSFT]) -> list[torch.Tensor]:
        """Per-sequence response log-probs (1-D tensors) under `model`, without gradients."""
        out = []
        for chunk in chunks(items, self.micro_batch_size()):
            logps, mask, _ = self.logprobs(model, list(chunk))
            out += [row[: int(m.sum())].float() for row, m in zip(logps, mask)]
        return out

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        stage, times = self.stage, {}
        start = time.perf_counter()
        indices = self.batches.take(stage.batch_size)
        prompt_ids = [self.train_set[i].prompt_ids for i in indices]
        prompts = [self.tokenizer.decode(p) for p in prompt_ids]
        responses = self.sample(prompt_ids, stage.samples_per_prompt)
        times["generation"] = time.perf_counter() - start

        t = time.perf_counter()
        repeated_prompts = [p for p in prompts for _ in range(stage.samples_per_prompt)]
        repeated_ids = [p for p in prompt_ids for _ in range(stage.samples_per_prompt)]
        rewards, raw, has_eos, _ = self.score(repeated_prompts, repeated_ids, responses)
        advantages = group_advantages(rewards, stage.samples_per_prompt, stage.scale_rewards_by_std)
        times["scoring"] = time.perf_counter() - t

        t = time.perf_counter()
        # A response must have at least one token to be trained on; an empty one keeps its group's statistics.
        items = [TokenizedSFT(p, r) for p, r in zip(repeated_ids, responses)]
        keep = [k for k, r in enumerate(responses) if r]
        ref_logps = self.score_rollout(self.reference, [items[k] for k in keep])
        single_update = stage.updates_per_rollout == 1 and stage.minibatch_size == self.rollout_size
        old_logps = None if single_update else self.score_rollout(self.model, [items[k] for k in keep])
        times["reference"] = time.perf_counter() - t

        t = time.perf_counter()
        stats = self.update(items, keep, advantages, ref_logps, old_logps)
        times["update"] = time.perf_counter() - t

        lengths = torch.tensor([len(r) for r in responses], dtype=torch.float32)
        return {"train/reward_mean": float(rewards.mean()), "train/reward_std": float(rewards.std()),
                "train/score_mean": float(raw.mean()), "train/eos_rate": sum(has_eos) / len(has_eos),
                "train/response_length": float(lengths.mean()), **stats,
                **{f"time/{k}_s": v for k, v in times.items()}, "time/step_s": time.perf_counter() - start}

    def update(self, items, keep, advantages, ref_logps, old_logps) -> dict[str, float]:
        stage = self.stage
        sums: dict[str, list[float]] = {k: [] for k in ("loss", "kl", "entropy", "clip_fraction", "approx_kl",
                                                        "ratio_mean", "ratio_max", "ratio_min", "grad_norm")}
        first = {}
        position = {k: j for j, k in enumerate(keep)}
        for epoch in range(stage.updates_per_rollout):
            order = [keep[j] for j in torch.randperm(len(keep)).tolist()]
            for minibatch in chunks(order, stage.minibatch_size):
                tokens = sum(len(items[k].response_ids) for k in minibatch)
                for micro in chunks(minibatch, self.micro_batch_size()):
                    logps, mask, entropy = self.logprobs(self.model, [items[k] for k in micro], with_entropy=True)
                    ref = _pad([ref_logps[position[k]] for k in micro], logps.shape[1])
                    old = logps.detach() if old_logps is None else _pad(
                        [old_logps[position[k]] for k in micro], logps.shape[1])
                    adv = advantages[list(micro)].to(logps.device)[:, None]
                    pg_loss, clipped = clipped_policy_loss(logps, old, adv, stage.clip_ratio, stage.dual_clip_c)
                    kl = kl_penalty(logps, ref, stage.kl_estimator)
                    per_token = pg_loss + stage.kl_coef * kl
                    if stage.loss_aggregation == "token-mean":  # exact over the minibatch's tokens
                        loss = (per_token * mask).sum() / tokens
                    else:
                        loss = aggregate_loss(per_token, mask, stage.loss_aggregation) * len(micro) / len(minibatch)
                    loss.backward()
                    with torch.no_grad():
                        log_ratio = (logps - old) * mask
                        ratio = torch.exp(log_ratio)[mask.bool()]
                        sums["loss"].append(float(loss) * len(minibatch) / len(micro))
                        sums["kl"].append(float(masked_mean(kl, mask)))
                        sums["entropy"].append(float(masked_mean(entropy, mask)))
                        sums["clip_fraction"].append(float(masked_mean(clipped.float(), mask)))
                        sums["approx_kl"].append(float(masked_mean(0.5 * log_ratio ** 2, mask)))
                        sums["ratio_mean"].append(float(ratio.mean()))
                        sums["ratio_max"].append(float(ratio.max()))
                        sums["ratio_min"].append(float(ratio.min()))
                    if not first:  # sanity: before any update the ratio is 1 and approx KL 0
                        first = {"train/first_minibatch_ratio": float(ratio.mean()),
                                 "train/first_minibatch_approx_kl": sums["approx_kl"][-1]}
                sums["grad_norm"].append(self.optimizer_step()["train/grad_norm"])
        out = {f"train/{k}": sum(v) / len(v) for k, v in sums.items() if v and k not in ("ratio_max", "ratio_min")}
        out["train/ratio_max"] = max(sums["ratio_max"]) if sums["ratio_max"] else 1.0
        out["train/ratio_min"] = min(sums["ratio_min"]) if sums["ratio_min"] else 1.0
        out["train/optimizer_steps"] = len(sums["grad_norm"])
        out["train/lr"] = self.scheduler.get_last_lr()[0]
        return {**out, **first}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean reward of one sample per held-out prompt (seeded, not moving the training RNG)."""
        prompt_ids = [x.prompt_ids for x in self.val_set]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + 1)  # the same draws at every evaluation
            responses = self.sample(prompt_ids, 1)
        prompts = [ex.prompt for ex in self.val_examples]
        rewards, raw, has_eos, texts = self.score(prompts, prompt_ids, responses)
        ref_logps = self.score_rollout(self.reference, [TokenizedSFT(p, r) for p, r in zip(prompt_ids, responses) if r])
        pol_logps = self.score_rollout(self.model, [TokenizedSFT(p, r) for p, r in zip(prompt_ids, responses) if r])
        kl = torch.cat([kl_penalty(a, b, "k3") for a, b in zip(pol_logps, ref_logps)]) if pol_logps else torch.zeros(1)
        n = min(self.stage.get("num_samples") or 0, len(texts))
        if n:
            self.tracker.log_table([{"step": self.step, "prompt": prompts[i][-600:], "generation": texts[i],
                                     "reward": float(rewards[i]), "ends_with_eos": has_eos[i],
                                     "length": len(responses[i])} for i in range(n)],
                                   f"samples/step_{self.step:06d}.json")
        return {"eval/reward_mean": float(rewards.mean()), "eval/score_mean": float(raw.mean()),
                "eval/eos_rate": sum(has_eos) / len(has_eos),
                "eval/response_length": sum(len(r) for r in responses) / len(responses),
                "eval/kl_to_reference": float(kl.mean())}


def _pad(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width, device=rows[0].device if rows else "cpu")
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out
