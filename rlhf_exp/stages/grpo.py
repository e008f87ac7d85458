"""Group relative policy optimization (GRPO; Shao et al. 2024, DeepSeekMath sec. 4).

One step = one rollout: `stage.batch_size` prompts x `stage.samples_per_prompt` samples from the policy
(KV cache, left padding, explicit stop tokens, temperature / top-k / top-p, the run's own generator),
scored by the `reward` group (a response without EOS gets `reward.missing_eos_score` instead), advantages
normalized within each prompt's group, then `stage.updates_per_rollout` passes over the rollout in
minibatches of `stage.minibatch_size` sequences; every minibatch is an optimizer step (the DGX Spark
seed stepped once per pass after zeroing per minibatch). Loss per token: clipped (optionally
dual-clipped) surrogate + kl_coef x a KL estimate (`stage.kl_estimator`: k3, TRL's and the paper's, whose
gradient is that of KL(reference || policy); k2, k1+ or k3+ for the gradient of KL(policy || reference);
plain k1 is refused: its expected gradient is zero), aggregated per `stage.loss_aggregation`.

`stage.loss_type` presets the two choices that define the variant (an explicit key wins):
  grpo     advantages divided by the group's std, seq-mean-token-mean (the paper)
  dr_grpo  no std division, seq-mean-token-sum-norm: a constant normalizer (the generation budget)
           instead of each response's length, which biased the paper's loss towards short correct and
           long wrong answers (Liu et al. 2025, "Understanding R1-Zero-like training")
Deviations: with one pass and one minibatch per rollout, the update's own forward gives the old log-probs
(ratio exactly 1) and no extra forward is made; otherwise the rollout is scored once before the updates.
Under torchrun (parallel=ddp / zero1) each rank samples, scores and trains on its share of the prompts
(whole groups, so advantages stay local); every minibatch is the ranks' shares together.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import DictConfig

from rlhf_exp.data.collate import TokenizedSFT
from rlhf_exp.errors import ConfigError
from rlhf_exp.losses.policy import KL_LOSS_ESTIMATORS, LOSS_AGGREGATIONS, aggregate_loss, clipped_policy_loss, \
    flat_groups, group_advantages, kl_penalty
from rlhf_exp.rollout import Rollout
from rlhf_exp.schema import OnlineRLConfig, Rule, key, one_of, optional, positive
from rlhf_exp.stages.online import OnlineRLTrainer, Stats, online_memory, policy_stats
from rlhf_exp.stages.spec import REPLICATED_WEIGHTS, StageSpec

log = logging.getLogger(__name__)

# loss_type -> (divide advantages by the group's std, loss aggregation)
LOSS_TYPES = {"grpo": (True, "seq-mean-token-mean"), "dr_grpo": (False, "seq-mean-token-sum-norm")}


@dataclass
class GRPOConfig(OnlineRLConfig):
    samples_per_prompt: int = key(Rule(lambda v: v >= 2, "must be >= 2 (advantages compare a prompt's samples)"))
    updates_per_rollout: int = key(positive())
    kl_estimator: str = key(Rule(lambda v: v in KL_LOSS_ESTIMATORS, f"must be one of {', '.join(KL_LOSS_ESTIMATORS)} "
                                 "(k1 as a loss has zero expected gradient: k1+ keeps its value with k2's gradient)"))
    loss_type: str = key(one_of(tuple(LOSS_TYPES)))
    scale_rewards_by_std: Optional[bool] = key()  # null: as loss_type says
    loss_aggregation: Optional[str] = key(optional(one_of(LOSS_AGGREGATIONS), "as loss_type says"))


def loss_settings(stage: DictConfig) -> tuple[bool, str]:
    """(scale advantages by the group std, loss aggregation): loss_type's, unless set explicitly."""
    by_std, aggregation = LOSS_TYPES[stage.loss_type]
    if stage.get("scale_rewards_by_std") is not None:
        by_std = stage.scale_rewards_by_std
    return by_std, stage.get("loss_aggregation") or aggregation


class GRPOTrainer(OnlineRLTrainer):

    # ------------------------------------------------------------------ setup
    def setup_data_and_model(self) -> None:
        self.rollout_size = self.stage.batch_size * self.stage.samples_per_prompt
        self.scale_by_std, self.aggregation = loss_settings(self.stage)
        self.model = self.setup_policy()

    def total_optimizer_steps(self) -> int:
        return self.stage.max_steps * self.stage.updates_per_rollout * (self.rollout_size // self.stage.minibatch_size)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        stage, times = self.stage, {}
        start = time.perf_counter()
        group = stage.samples_per_prompt
        indices = self.tools.shard(self.batches.take(stage.batch_size))  # this rank's prompts (all in one process)
        prompt_ids = [self.train_set[i].prompt_ids for i in indices]
        responses = self.sample(prompt_ids, group)
        times["generation"] = time.perf_counter() - start

        t = time.perf_counter()
        prompts = [self.tokenizer.decode(p) for p in prompt_ids for _ in range(group)]
        scores = self.score(prompts, responses, [self.train_examples[i].row for i in indices for _ in range(group)])
        rewards, stopped = scores.rewards, scores.stopped
        advantages = group_advantages(rewards, group, self.scale_by_std)
        flat = flat_groups(rewards, group)
        if bool(flat.all()):
            log.warning("grpo step %d: no learning signal: every group's rewards are identical (%s); the update "
                        "only moves the policy toward the reference (KL term)", self.step + 1,
                        "no sample reached EOS" if not any(stopped) else f"all {float(rewards[0]):.4g}")
        times["scoring"] = time.perf_counter() - t

        t = time.perf_counter()
        items = [TokenizedSFT(prompt_ids[k // group], response) for k, response in enumerate(responses)]
        single_update = stage.updates_per_rollout == 1 and stage.minibatch_size == self.rollout_size
        rollout = self.make_rollout(items, with_old_logps=not single_update)
        rollout.advantages = advantages.to(self.device)[:, None] * rollout.mask
        times["reference"] = time.perf_counter() - t

        t = time.perf_counter()
        stats = self.update(rollout, stage.updates_per_rollout)
        times["update"] = time.perf_counter() - t
        return {**self.rollout_metrics(scores, responses), **stats,
                "train/flat_group_fraction": float(flat.float().mean()),
                **{f"time/{k}_s": v for k, v in times.items()}, "time/step_s": time.perf_counter() - start}

    def minibatch_loss(self, micro: Rollout, size: dict[str, float]) -> tuple[torch.Tensor, Stats]:
        stage = self.stage
        logps, mask, entropy = self.logprobs(self.model, micro.items, with_entropy=True)
        old = logps.detach() if micro.old_logps is None else micro.old_logps
        pg_loss, clipped = clipped_policy_loss(logps, old, micro.advantages, stage.clip_ratio, stage.dual_clip_c)
        per_token = pg_loss
        if stage.kl_coef:
            per_token = per_token + stage.kl_coef * kl_penalty(logps, micro.ref_logps, stage.kl_estimator)
        loss = aggregate_loss(per_token, mask, self.aggregation, max_tokens=stage.generation.max_new_tokens,
                              num_sequences=size["sequences"], num_tokens=size["tokens"])
        return loss, policy_stats(logps, old, micro.ref_logps, mask, clipped, entropy)


def checks(cfg: DictConfig) -> None:
    rollout = cfg.stage.batch_size * cfg.stage.samples_per_prompt
    if rollout % cfg.stage.minibatch_size:
        raise ConfigError("stage.minibatch_size", f"must divide the rollout: batch_size x samples_per_prompt = "
                          f"{rollout} (got {cfg.stage.minibatch_size})")


def memory(cfg: DictConfig):
    # under torchrun each rank samples its share of the prompts
    rollout = cfg.stage.batch_size * cfg.stage.samples_per_prompt // int(cfg.get("parallel", {}).get("processes") or 1)
    return online_memory(cfg, "grpo", rollout, [])


STAGE = StageSpec(name="grpo", config=GRPOConfig, trainer=GRPOTrainer, micro_batch="grpo", memory=memory,
                  micro_batch_default=8, uses_reward=True, batch_key="minibatch_size", parallel=REPLICATED_WEIGHTS, checks=checks,
                  parallel_note="samples with the whole model on every rank",
                  resume_fixed=("stage", "model", "data", "seed", "reward"),
                  objective=("eval/reward_mean", "max"),
                  report_metrics=("eval/reward_mean", "eval/kl_k3", "eval/response_length"),
                  tradeoff=("eval/kl_k3", "eval/reward_mean"))
