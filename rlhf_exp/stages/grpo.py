"""Group relative policy optimization (GRPO; Shao et al. 2024, DeepSeekMath sec. 4) and the critic-free
algorithms that differ from it in one or two choices: Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++.

One step = one rollout: `stage.batch_size` prompts x `stage.samples_per_prompt` samples from the policy
(KV cache, left padding, explicit stop tokens, temperature / top-k / top-p, the run's own generator),
scored by the `reward` group (a response without EOS gets `reward.missing_eos_score` instead), advantages
from the rewards (`stage.advantage`), then `stage.updates_per_rollout` passes over the rollout in
minibatches of `stage.minibatch_size` sequences; every minibatch is an optimizer step (the DGX Spark
seed stepped once per pass after zeroing per minibatch). Loss per token: clipped (optionally
dual-clipped) surrogate + kl_coef x a KL estimate (`stage.kl_estimator`: k3, TRL's and the paper's, whose
gradient is that of KL(reference || policy); k2, k1+ or k3+ for the gradient of KL(policy || reference);
plain k1 is refused: its expected gradient is zero), aggregated per `stage.loss_aggregation`; or, with
`stage.kl_in_reward`, kl_coef x k1 subtracted from every token's reward instead (RLOO, REINFORCE++).

`stage.loss_type` names an algorithm: a `Variant` in the VARIANTS registry below presets the keys that define
it (each key, set explicitly, wins). They are presets of this stage, not stages of their own, because each
differs from GRPO only in these choices: the rollout, the reward, the reference and the update loop are the same.
Deviations: with one pass and one minibatch per rollout, the update's own forward gives the old log-probs
(ratio exactly 1) and no extra forward is made (unless the KL goes in the reward: that needs the rollout's
log-probs first); otherwise the rollout is scored once before the updates.
Under torchrun (parallel=ddp / zero1) each rank samples, scores and trains on its share of the prompts
(whole groups, so advantages stay local); every minibatch is the ranks' shares together.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
from omegaconf import DictConfig

from rlhf_exp import distributed
from rlhf_exp.data.collate import TokenizedSFT
from rlhf_exp.errors import ConfigError
from rlhf_exp.losses.policy import ADVANTAGE_ESTIMATORS, IMPORTANCE_SAMPLING_LEVELS, KL_LOSS_ESTIMATORS, \
    LOSS_AGGREGATIONS, aggregate_loss, clipped_policy_loss, flat_groups, kl_penalty, overlong_penalty
from rlhf_exp.registry import Registry
from rlhf_exp.rewards import Scores
from rlhf_exp.rollout import Rollout
from rlhf_exp.schema import OnlineRLConfig, Rule, in_range, key, one_of, optional, positive
from rlhf_exp.stages.online import OnlineRLTrainer, Stats, online_memory, policy_stats
from rlhf_exp.stages.spec import REPLICATED_WEIGHTS, StageSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """What a `stage.loss_type` presets; each field is the stage key of the same name (null there: this value)."""
    advantage: str                       # ADVANTAGE_ESTIMATORS
    loss_aggregation: str                # LOSS_AGGREGATIONS
    importance_sampling_level: str = "token"  # IMPORTANCE_SAMPLING_LEVELS
    clip_ratio: float = 0.2              # the low side, 1 - e_low
    clip_ratio_high: Optional[float] = None  # 1 + e_high; None: clip_ratio (symmetric)
    kl_in_reward: bool = False           # kl_coef x k1 on every token's reward, no KL loss term
    dynamic_sampling: bool = False       # drop groups whose rewards are all equal, sample more prompts
    overlong_buffer: float = 0.0         # soft overlong penalty over this fraction of max_new_tokens


# loss_type -> the algorithm's choices. What each follows:
VARIANTS = Registry("GRPO loss_type")
# Shao et al. 2024 (DeepSeekMath): group-normalized advantages, each response's token mean
VARIANTS.register("grpo")(Variant("grpo", "seq-mean-token-mean"))
# Liu et al. 2025 ("Understanding R1-Zero-like training"): no std division, a constant normalizer (the generation
# budget) instead of each response's length, which biased the paper's loss towards short correct and long wrong
VARIANTS.register("dr_grpo")(Variant("group_mean", "seq-mean-token-sum-norm"))
# Yu et al. 2025 (DAPO): clip-higher 0.2 / 0.28, dynamic sampling, token-level loss, soft overlong punishment
# (the paper's 4,096 of 20,480 tokens: a fifth of the budget); the paper also drops the KL term (kl_coef=0)
VARIANTS.register("dapo")(Variant("grpo", "token-mean", clip_ratio=0.2, clip_ratio_high=0.28,
                                  dynamic_sampling=True, overlong_buffer=0.2))
# Zheng et al. 2025 (GSPO): the length-normalized sequence ratio, clipped per response at the paper's 3e-4 / 4e-4
VARIANTS.register("gspo")(Variant("grpo", "seq-mean-token-mean", "sequence", clip_ratio=3e-4, clip_ratio_high=4e-4))
# GSPO-token: the sequence ratio's value with each token's gradient (token-level advantages possible)
VARIANTS.register("gspo_token")(Variant("grpo", "seq-mean-token-mean", "sequence_token", clip_ratio=3e-4,
                                        clip_ratio_high=4e-4))
# Ahmadian et al. 2024 (RLOO): leave-one-out baseline, the whole response's likelihood ratio (REINFORCE's
# gradient at ratio 1), KL in the reward: TRL's RLOOTrainer
VARIANTS.register("rloo")(Variant("rloo", "seq-mean-token-mean", "sequence_sum", kl_in_reward=True))
# Hu 2025 (REINFORCE++): token-level KL in the reward, returns whitened over the whole batch, PPO's clip, no critic
VARIANTS.register("reinforce_pp")(Variant("reinforce_pp", "token-mean", kl_in_reward=True))
VARIANTS.register("reinforce_pp_baseline")(Variant("reinforce_pp_baseline", "token-mean", kl_in_reward=True))


@dataclass
class GRPOConfig(OnlineRLConfig):
    samples_per_prompt: int = key(Rule(lambda v: v >= 2, "must be >= 2 (advantages compare a prompt's samples)"))
    updates_per_rollout: int = key(positive())
    kl_estimator: str = key(Rule(lambda v: v in KL_LOSS_ESTIMATORS, f"must be one of {', '.join(KL_LOSS_ESTIMATORS)} "
                                 "(k1 as a loss has zero expected gradient: k1+ keeps its value with k2's gradient)"))
    loss_type: str = key(one_of(VARIANTS))
    clip_ratio: Optional[float] = key(optional(in_range(0, 1, "()"), "as loss_type says"))
    clip_ratio_high: Optional[float] = key(optional(in_range(0, 10, "()"), "as loss_type says"))
    advantage: Optional[str] = key(optional(one_of(ADVANTAGE_ESTIMATORS), "as loss_type says"))
    loss_aggregation: Optional[str] = key(optional(one_of(LOSS_AGGREGATIONS), "as loss_type says"))
    importance_sampling_level: Optional[str] = key(optional(one_of(IMPORTANCE_SAMPLING_LEVELS), "as loss_type says"))
    kl_in_reward: Optional[bool] = key()            # null: as loss_type says
    dynamic_sampling: Optional[bool] = key()        # null: as loss_type says
    max_sampling_rounds: int = key(positive())      # dynamic sampling: rollouts drawn per step at most
    overlong_buffer: Optional[float] = key(optional(in_range(0, 1, "[)"), "as loss_type says"))
    overlong_penalty_factor: float = key(Rule(lambda v: v >= 0, "must be >= 0"))
    max_generated_tokens: Optional[int] = key(optional(positive(), "no budget"))  # training ends once reached


def variant(stage: DictConfig) -> Variant:
    """loss_type's choices, each replaced by its stage key where that is set."""
    preset = VARIANTS.lookup(stage.loss_type)
    chosen = {f.name: stage.get(f.name) for f in fields(Variant)}
    merged = Variant(**{name: getattr(preset, name) if value is None else value for name, value in chosen.items()})
    if stage.get("clip_ratio") is not None and stage.get("clip_ratio_high") is None:
        merged = replace(merged, clip_ratio_high=None)  # an explicit clip_ratio is symmetric
    return merged


class GRPOTrainer(OnlineRLTrainer):
    generated_tokens = 0  # by every training rollout so far, every rank and sampling round (resumed with the run)

    # ------------------------------------------------------------------ setup
    def setup_data_and_model(self) -> None:
        self.rollout_size = self.stage.batch_size * self.stage.samples_per_prompt
        self.variant = variant(self.stage)
        self.model = self.setup_policy()

    def total_optimizer_steps(self) -> int:
        return self.stage.max_steps * self.stage.updates_per_rollout * (self.rollout_size // self.stage.minibatch_size)

    def budget_spent(self) -> bool:
        """stage.max_generated_tokens reached (checked between steps: the last step may pass it): algorithms that
        sample more per step (DAPO's dynamic sampling) compare with the others at an equal sampling cost."""
        budget = self.stage.get("max_generated_tokens")
        if budget and self.generated_tokens >= budget:
            log.info("grpo: %d tokens generated by step %d, the budget stage.max_generated_tokens=%d: training ends",
                     self.generated_tokens, self.step, budget)
            return True
        return False

    def extra_state(self) -> dict:
        return {"generated_tokens": self.generated_tokens}

    def load_extra_state(self, state: dict) -> None:
        self.generated_tokens = int(state.get("generated_tokens", 0))

    # ------------------------------------------------------------------ one step
    def draw_groups(self, times: dict[str, float]) -> tuple[list[list[int]], list[list[int]], Scores, dict[str, float]]:
        """This step's prompts (one per group), responses (G per prompt, adjacent) and their scores; the seconds
        spent sampling and scoring are added to `times`.

        With dynamic sampling (DAPO) groups whose rewards are all equal teach nothing: they are dropped and more
        prompts drawn, up to stage.max_sampling_rounds rollouts; if the cap comes first, dropped groups fill the
        batch (their advantages are 0) and a warning says so."""
        stage, group = self.stage, self.stage.samples_per_prompt
        kept, dropped, rounds = [], [], 0
        while len(kept) < stage.batch_size and rounds < (stage.max_sampling_rounds if self.variant.dynamic_sampling else 1):
            rounds += 1
            indices = self.tools.shard(self.batches.take(stage.batch_size))  # this rank's prompts (all in one process)
            prompt_ids = [self.train_set[i].prompt_ids for i in indices]
            t = time.perf_counter()
            responses = self.sample(prompt_ids, group)
            times["generation"] = times.get("generation", 0.0) + time.perf_counter() - t
            self.generated_tokens += int(distributed.sum_values({"tokens": sum(map(len, responses))})["tokens"])
            t = time.perf_counter()
            prompts = [self.tokenizer.decode(p) for p in prompt_ids for _ in range(group)]
            scores = self.score(prompts, responses, [self.train_examples[i].row for i in indices for _ in range(group)])
            times["scoring"] = times.get("scoring", 0.0) + time.perf_counter() - t
            flat = flat_groups(scores.rewards, group).tolist() if self.variant.dynamic_sampling else [False] * len(indices)
            for k, is_flat in enumerate(flat):
                members = list(range(k * group, (k + 1) * group))
                (dropped if is_flat else kept).append((prompt_ids[k], [responses[m] for m in members],
                                                       scores.subset(members)))
        stats = {}
        if self.variant.dynamic_sampling:
            stats = {"train/sampling_rounds": float(rounds), "train/dropped_groups": float(len(dropped))}
            if len(kept) < stage.batch_size:
                log.warning("grpo step %d: dynamic sampling kept %d of %d groups after %d rollouts "
                            "(stage.max_sampling_rounds); %d groups with equal rewards fill the batch",
                            self.step + 1, len(kept), stage.batch_size, rounds, stage.batch_size - len(kept))
        chosen = (kept + dropped)[:stage.batch_size]
        return [c[0] for c in chosen], [r for c in chosen for r in c[1]], Scores.concat([c[2] for c in chosen]), stats

    def train_step(self) -> dict[str, float]:
        stage, choice, times = self.stage, self.variant, {}
        start = time.perf_counter()
        group = stage.samples_per_prompt
        prompt_ids, responses, scores, sampling = self.draw_groups(times)

        t = time.perf_counter()
        rewards, stopped = scores.rewards, scores.stopped
        if choice.overlong_buffer:
            budget = int(stage.generation.max_new_tokens)
            penalty = overlong_penalty(torch.tensor([len(r) for r in responses]), budget,
                                       round(choice.overlong_buffer * budget), stage.overlong_penalty_factor)
            rewards = rewards + penalty
            sampling["train/overlong_penalty_mean"] = float(penalty.mean())
        flat = flat_groups(rewards, group)
        if bool(flat.all()):
            log.warning("grpo step %d: no learning signal: every group's rewards are identical (%s); the update "
                        "only moves the policy toward the reference (KL term)", self.step + 1,
                        "no sample reached EOS" if not any(stopped) else f"all {float(rewards[0]):.4g}")
        items = [TokenizedSFT(prompt_ids[k // group], response) for k, response in enumerate(responses)]
        kl_in_reward = choice.kl_in_reward and self.reference is not None
        single_update = stage.updates_per_rollout == 1 and stage.minibatch_size == self.rollout_size
        rollout = self.make_rollout(items, with_old_logps=not single_update or kl_in_reward)
        mask = rollout.mask
        kl, token_rewards = self.token_rewards(rollout, rewards, with_kl=kl_in_reward)
        rollout.advantages = ADVANTAGE_ESTIMATORS.lookup(choice.advantage)(token_rewards, mask, group) * mask
        times["reference_and_advantages"] = time.perf_counter() - t

        t = time.perf_counter()
        stats = self.update(rollout, stage.updates_per_rollout)
        times["update"] = time.perf_counter() - t
        extra = {"train/non_score_reward": float((-stage.kl_coef * kl).sum(-1).mean())} if kl_in_reward else {}
        return {**self.rollout_metrics(scores, responses), **stats, **sampling, **extra,
                "train/flat_group_fraction": float(flat.float().mean()),
                "train/generated_tokens": float(self.generated_tokens),
                **{f"time/{k}_s": v for k, v in times.items()}, "time/step_s": time.perf_counter() - start}

    def minibatch_loss(self, micro: Rollout, size: dict[str, float]) -> tuple[torch.Tensor, Stats]:
        stage, choice = self.stage, self.variant
        logps, mask, entropy = self.logprobs(self.model, micro.items, with_entropy=True)
        old = logps.detach() if micro.old_logps is None else micro.old_logps
        pg_loss, clipped = clipped_policy_loss(logps, old, micro.advantages, choice.clip_ratio, stage.dual_clip_c,
                                               clip_ratio_high=choice.clip_ratio_high,
                                               level=choice.importance_sampling_level, mask=mask)
        per_token = pg_loss
        if stage.kl_coef and not choice.kl_in_reward:
            per_token = per_token + stage.kl_coef * kl_penalty(logps, micro.ref_logps, stage.kl_estimator)
        loss = aggregate_loss(per_token, mask, choice.loss_aggregation, max_tokens=stage.generation.max_new_tokens,
                              num_sequences=size["sequences"], num_tokens=size["tokens"])
        return loss, policy_stats(logps, old, micro.ref_logps, mask, clipped, entropy)


def checks(cfg: DictConfig) -> None:
    rollout = cfg.stage.batch_size * cfg.stage.samples_per_prompt
    if rollout % cfg.stage.minibatch_size:
        raise ConfigError("stage.minibatch_size", f"must divide the rollout: batch_size x samples_per_prompt = "
                          f"{rollout} (got {cfg.stage.minibatch_size})")
    choice = variant(cfg.stage)
    processes = int(cfg.get("parallel", {}).get("processes") or 1)
    if choice.dynamic_sampling and processes > 1:
        raise ConfigError("stage.dynamic_sampling", f"runs in one process (each rank would draw its own number of "
                          f"rollouts); got {processes} processes: set stage.dynamic_sampling=false")


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
