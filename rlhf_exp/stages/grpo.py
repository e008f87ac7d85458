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
Under torchrun (parallel=ddp / zero1) each rank samples, scores and trains on its share of the
prompts (whole groups, so advantages stay local) and every minibatch is the ranks' shares
together: losses are normalized by the global minibatch's tokens (or sequences), gradients summed.
"""

from __future__ import annotations

import time

import torch

from rlhf_exp import distributed
from rlhf_exp.data.collate import TokenizedSFT
from rlhf_exp.errors import ConfigError
from rlhf_exp.losses.policy import aggregate_loss, clipped_policy_loss, group_advantages, kl_penalty, masked_mean
from rlhf_exp.stages.base import chunks
from rlhf_exp.stages.online import OnlineRLTrainer, pad_rows


class GRPOTrainer(OnlineRLTrainer):

    # ------------------------------------------------------------------ setup
    def setup_data_and_model(self) -> None:
        stage = self.stage
        self.rollout_size = stage.batch_size * stage.samples_per_prompt
        if self.rollout_size % stage.minibatch_size:
            raise ConfigError("stage.minibatch_size", f"must divide the rollout: batch_size x samples_per_prompt = "
                              f"{self.rollout_size} (got {stage.minibatch_size})")
        self.model = self.setup_policy()

    def total_optimizer_steps(self) -> int:
        return self.stage.max_steps * self.stage.updates_per_rollout * (self.rollout_size // self.stage.minibatch_size)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        stage, times = self.stage, {}
        start = time.perf_counter()
        indices = self.shard(self.batches.take(stage.batch_size))  # this rank's prompts (all in one process)
        prompt_ids = [self.train_set[i].prompt_ids for i in indices]
        prompts = [self.tokenizer.decode(p) for p in prompt_ids]
        responses = self.sample(prompt_ids, stage.samples_per_prompt)
        times["generation"] = time.perf_counter() - start

        t = time.perf_counter()
        repeated_prompts = [p for p in prompts for _ in range(stage.samples_per_prompt)]
        repeated_ids = [p for p in prompt_ids for _ in range(stage.samples_per_prompt)]
        rewards, raw, has_eos, _ = self.score(repeated_prompts, responses)
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

        rewards = rewards.double()
        total = distributed.sum_values({"n": len(responses), "reward": float(rewards.sum()),
                                        "reward_sq": float((rewards ** 2).sum()), "score": float(raw.sum()),
                                        "eos": sum(has_eos), "length": sum(len(r) for r in responses)})
        n, mean = total["n"], total["reward"] / total["n"]
        std = max(total["reward_sq"] - n * mean ** 2, 0.0) / max(n - 1, 1)  # unbiased, as torch.std
        return {"train/reward_mean": mean, "train/reward_std": std ** 0.5, "train/score_mean": total["score"] / n,
                "train/eos_rate": total["eos"] / n, "train/response_length": total["length"] / n,
                "train/rollout_sequences": n, **stats,
                **{f"time/{k}_s": v for k, v in times.items()}, "time/step_s": time.perf_counter() - start}

    def update(self, items, keep, advantages, ref_logps, old_logps) -> dict[str, float]:
        stage = self.stage
        sums: dict[str, list[float]] = {k: [] for k in ("loss", "kl", "entropy", "clip_fraction", "approx_kl",
                                                        "ratio_mean", "ratio_max", "ratio_min", "grad_norm")}
        first = {}
        position = {k: j for j, k in enumerate(keep)}
        kept = set(keep)
        for epoch in range(stage.updates_per_rollout):
            # minibatches over the whole rollout (every rank steps as often); empty responses left out of each
            order = torch.randperm(len(items)).tolist()
            for share in chunks(order, stage.minibatch_size // self.world_size):
                minibatch = [k for k in share if k in kept]
                size = distributed.sum_values({"tokens": sum(len(items[k].response_ids) for k in minibatch),
                                               "sequences": len(minibatch)})  # of the global minibatch
                tokens, sequences = size["tokens"], size["sequences"]
                for micro in chunks(minibatch, self.micro_batch_size()):
                    logps, mask, entropy = self.logprobs(self.model, [items[k] for k in micro], with_entropy=True)
                    ref = pad_rows([ref_logps[position[k]] for k in micro], logps.shape[1])
                    old = logps.detach() if old_logps is None else pad_rows(
                        [old_logps[position[k]] for k in micro], logps.shape[1])
                    adv = advantages[list(micro)].to(logps.device)[:, None]
                    pg_loss, clipped = clipped_policy_loss(logps, old, adv, stage.clip_ratio, stage.dual_clip_c)
                    kl = kl_penalty(logps, ref, stage.kl_estimator)
                    per_token = pg_loss + stage.kl_coef * kl
                    if stage.loss_aggregation == "token-mean":  # exact over the minibatch's tokens
                        loss = (per_token * mask).sum() / tokens
                    else:
                        loss = aggregate_loss(per_token, mask, stage.loss_aggregation) * len(micro) / sequences
                    self.backward(loss)
                    with torch.no_grad():
                        log_ratio = (logps - old) * mask
                        ratio = torch.exp(log_ratio)[mask.bool()]
                        sums["loss"].append(float(loss) * sequences / len(micro))
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
        # means over every rank's micro batches; the ratio's extremes over all of them
        ranks = distributed.gather_objects({k: v for k, v in sums.items() if k != "grad_norm"})
        out = {}
        for k in sums:
            values = sums[k] if k == "grad_norm" else [x for r in ranks for x in r[k]]
            if k in ("ratio_max", "ratio_min"):
                out[f"train/{k}"] = (max if k == "ratio_max" else min)(values) if values else 1.0
            elif values:
                out[f"train/{k}"] = sum(values) / len(values)
        out["train/optimizer_steps"] = len(sums["grad_norm"])
        out["train/lr"] = self.scheduler.get_last_lr()[0]
        return {**out, **first}
