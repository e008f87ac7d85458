"""What GRPO and PPO share: prompts, a frozen reference, the reward source, sampling from the run's own
generator, scoring, response log-probs, the held-out evaluation, and one update loop over a `Rollout`.

A stage builds its rollout and supplies `minibatch_loss`; `update` does the rest: epochs of shuffled
minibatches (every rank's share together), micro batches, backward, an optimizer step per minibatch (none
for a minibatch of only empty responses), the first minibatch's ratio / approx-KL sanity check (N+), and
statistics that are exact token-weighted means over every micro batch and rank.
"""

from __future__ import annotations

import copy
import functools
from collections import defaultdict

import torch
from omegaconf import DictConfig, OmegaConf

from rlhf_exp import distributed, stopping
from rlhf_exp.data.collate import TokenizedSFT
from rlhf_exp.distributed import shards_weights
from rlhf_exp.losses.policy import kl_penalty, per_token_rewards
from rlhf_exp.evaluation.statistics import std_from_sums
from rlhf_exp.models.loading import with_generation_stops
from rlhf_exp.models.peft import is_4bit, is_peft
from rlhf_exp.rewards import Scores, build_rewards, reward_function_metrics, reward_function_totals, score_responses
from rlhf_exp.rollout import Rollout
from rlhf_exp.rollout.batch import pad_rows, response_mask
from rlhf_exp.rollout.vllm_engine import VLLMRollouts, require_vllm
from rlhf_exp.stages.base import Trainer
from rlhf_exp.stages.spec import Activations, HeldModel, StageMemory, compute_bytes, frozen_reference, micro_batch, \
    sequence_tokens

Stats = dict[str, tuple[float, float]]  # name -> (sum, count): means that add up exactly over micro batches and ranks


def policy_stats(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None, mask: torch.Tensor,
                 clipped: torch.Tensor, entropy: torch.Tensor | None) -> Stats:
    """Per-token diagnostics of a micro batch ([B, R] tensors): ratio to the sampling policy, approx-KL to it,
    clip fraction, entropy, and `kl_k3`: the k3 estimate of KL(policy || reference), the same in GRPO and PPO."""
    with torch.no_grad():
        log_ratio = (logps - old_logps) * mask
        tokens = float(mask.sum())
        per_token = {"ratio_mean": torch.exp(log_ratio), "approx_kl": 0.5 * log_ratio ** 2,
                     "clip_fraction": clipped.float()}
        if ref_logps is not None:  # no reference held (kl_coef=0): no KL to report
            per_token["kl_k3"] = kl_penalty(logps, ref_logps, "k3")
        if entropy is not None:
            per_token["entropy"] = entropy
        return {name: (float((value * mask).sum()), tokens) for name, value in per_token.items()}


class OnlineRLTrainer(Trainer):
    curve_metrics = ("train/reward_mean", "eval/reward_mean")
    _sampling_copy: torch.nn.Module | None = None
    _sampling_copy_at = -1
    optimizer_steps = 0  # in this process: when the sampling copy is stale

    def setup_policy(self):
        """Prompts (with the data's reference responses where it has them), the policy, its frozen reference and the reward source.

        Returns the policy; the stage decides what `self.model` (the optimized module) holds.
        """
        require_vllm(self.cfg.hardware, self.world_size)  # before any weights are read
        self.prepare_data("prompt")
        self.check_prompt_data()
        policy = self.tools.load_policy()
        self.tools.stop_token_ids = with_generation_stops(self.stop_token_ids, policy)
        # LoRA: the policy with adapters disabled; none at all without a KL term (or report_kl)
        self.reference = self.tools.frozen_reference(policy) if uses_reference(self.cfg) else None
        self.rewards = build_rewards(self.cfg.reward, self.cfg.allowed_targets)
        return policy

    def plotted_metrics(self) -> list[str]:
        """The reward curves, and each reward function's held-out mean (with its interval for a 0/1 check)."""
        return [*self.curve_metrics, *sorted(name for name in self.history
                                             if name.startswith("eval/rewards/") and name.endswith("/mean"))]

    def check_prompt_data(self) -> None:
        """What the stage needs of its prompts beyond their text, checked before any weights load (PPO-ptx:
        references)."""

    @property
    def policy(self):
        return self.model

    @property
    def eval_policy(self):
        """The model evaluation samples from (PPO: the EMA of the actor when kept)."""
        return self.policy

    def sample(self, prompt_ids, samples, model=None, generator=None, desc=None) -> list[list[int]]:
        model = model if model is not None else self.policy
        if self.cfg.hardware.rollout_backend == "vllm" and model is self.policy:
            return self.vllm_rollouts.generate(prompt_ids, samples, model, self.tokenizer, self.step,
                                               self.stage.generation, self.stop_token_ids,
                                               generator if generator is not None else self.random.rollout)
        if model is self.policy:
            model = self.sampling_policy()
        return super().sample(prompt_ids, samples, model, generator, desc)

    @functools.cached_property
    def samples_from_a_copy(self) -> bool:
        """Whether rollouts sample from a compute-dtype copy of the policy (`sampling_policy`): a policy trained in
        full with fp32 master weights under 16-bit autocast, whole on this rank (not FSDP / ZeRO-3 shards)."""
        policy = self.policy
        return (self.runtime.precision != "fp32" and not is_peft(policy) and not is_4bit(policy)
                and not distributed.is_sharded(policy) and not shards_weights(self.cfg.get("parallel") or {})
                and any(p.requires_grad and p.dtype == torch.float32 for p in policy.parameters()))

    def sampling_policy(self):
        """What the built-in sampler decodes with: the policy, or (`samples_from_a_copy`) a copy of it in the
        compute dtype, made at the first rollout and refreshed when an optimizer step has moved the policy.
        Under autocast every fp32 weight is cast again at every decode step (a cast is kept only within one
        autocast region, and never for a weight without gradients); the copy casts once per update, for 2 bytes
        a weight. Log-probs are still the policy's own (`logprobs`)."""
        if not self.samples_from_a_copy:
            return self.policy
        if self._sampling_copy is None:
            self._sampling_copy = copy.deepcopy(self.policy).to(self.runtime.compute_dtype).eval().requires_grad_(False)
        elif self._sampling_copy_at != self.optimizer_steps:
            with torch.no_grad():
                for kept, param in zip(self._sampling_copy.parameters(), self.policy.parameters(), strict=True):
                    kept.copy_(param)
        self._sampling_copy_at = self.optimizer_steps
        return self._sampling_copy

    @functools.cached_property
    def vllm_rollouts(self) -> VLLMRollouts:
        prompt, _ = sequence_tokens(self.cfg)
        return VLLMRollouts(self.cfg.hardware, self.run_dir / "vllm_model",
                            prompt + int(self.stage.generation.max_new_tokens), int(self.cfg.seed),
                            self.runtime.precision)

    def longest_sequences(self) -> tuple[int, int | None] | None:
        """The longest prompt; responses are sampled (up to stage.generation.max_new_tokens), not read."""
        longest = super().longest_sequences()
        return None if longest is None else (longest[0], None)

    def score(self, prompts: list[str], responses: list[list[int]], rows: list[dict]) -> Scores:
        """The responses' rewards (the no-EOS score substituted), raw sums, each function's values, whether each
        stopped, and texts; `rows`: each response's prompt's data row (its columns go to the reward functions)."""
        return score_responses(self.rewards, self.tokenizer, prompts, responses, self.stop_token_ids,
                               self.cfg.reward.missing_eos_score, rows, self.step, int(self.stage.max_steps))

    def logprobs(self, model, items: list[TokenizedSFT], with_entropy: bool = False):
        """(log-probs [B, R], mask [B, R], entropy [B, R] or None) of the responses, at the sampling temperature;
        a prompt's samples share one row (its tokens run once) where the attention takes a block mask."""
        return self.tools.response_logprobs(model, items, self.stage.generation.temperature, with_entropy)

    @torch.no_grad()
    def rollout_logprobs(self, model, items: list[TokenizedSFT]) -> torch.Tensor:
        """[B, R] response log-probs under `model` (zero rows for empty responses), without gradients."""
        rows = [torch.zeros(0, device=self.device)] * len(items)
        kept = [k for k, item in enumerate(items) if item.response_ids]
        for start in range(0, len(kept), self.tools.micro_batch_size()):
            chunk = kept[start:start + self.tools.micro_batch_size()]
            logps, mask, _ = self.logprobs(model, [items[k] for k in chunk])
            for k, row, m in zip(chunk, logps, mask):
                rows[k] = row[: int(m.sum())].float()
        return pad_rows(rows, max((len(x.response_ids) for x in items), default=0), self.device)

    def make_rollout(self, items: list[TokenizedSFT], with_old_logps: bool = True) -> Rollout:
        """The rollout's masks and reference log-probs (and the sampling policy's, unless the update's own
        first forward will be them); advantages are filled in by the stage."""
        mask = response_mask(items, self.device)
        reference = None if self.reference is None else self.rollout_logprobs(self.reference, items)
        return Rollout(items=items, mask=mask, ref_logps=reference,
                       advantages=torch.zeros_like(mask),
                       old_logps=self.rollout_logprobs(self.policy, items) if with_old_logps else None)

    @torch.no_grad()
    def token_rewards(self, rollout: Rollout, scores: torch.Tensor, with_kl: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token KL [B, R], per-token rewards [B, R]): each response's score on its last token, minus
        stage.kl_coef x k1 of the sampling policy to the reference on every token (PPO, RLOO, REINFORCE++); no KL
        without a reference or `with_kl`."""
        mask = rollout.mask
        kl = torch.zeros_like(mask) if rollout.ref_logps is None or not with_kl else \
            kl_penalty(rollout.old_logps, rollout.ref_logps, "k1") * mask
        return kl, per_token_rewards(scores.to(self.device), kl, mask, self.stage.kl_coef)

    # ------------------------------------------------------------------ the update
    def minibatch_loss(self, micro: Rollout, size: dict[str, float]) -> tuple[torch.Tensor, Stats]:
        """A micro batch's share of its minibatch's loss (`size`: the whole minibatch's "tokens" and
        "sequences" over every rank), and its statistics."""
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Called after each optimizer step (PPO: the EMA)."""

    def update(self, rollout: Rollout, epochs: int) -> dict[str, float]:
        """`epochs` passes over `rollout` in minibatches of stage.minibatch_size sequences (every rank's
        share together), one optimizer step each."""
        share = self.stage.minibatch_size // self.world_size
        totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        losses, grad_norms, first, skipped = [], [], {}, 0.0
        lr = self.scheduler.get_last_lr()[0]
        for _ in range(epochs):
            order = torch.randperm(len(rollout), generator=self.random.shuffle).tolist()
            for start in range(0, len(order), share):
                minibatch = rollout.select(order[start:start + share])  # empty responses left out
                size = distributed.sum_values({"tokens": minibatch.tokens, "sequences": len(minibatch)})
                if size["sequences"] == 0:
                    continue  # nothing to learn from: no step (Adam's momentum would still move the weights)
                flat = {"loss": 0.0}
                for micro in minibatch.chunks(self.tools.micro_batch_size()):
                    loss, stats = self.minibatch_loss(micro, size)
                    self.backward(loss)
                    flat["loss"] += loss.item()
                    for name, (total, count) in stats.items():
                        flat[f"{name}:sum"] = flat.get(f"{name}:sum", 0.0) + total
                        flat[f"{name}:count"] = flat.get(f"{name}:count", 0.0) + count
                flat = distributed.sum_by_key(flat)  # this minibatch over every rank
                losses.append(flat.pop("loss"))
                for name in {k.rsplit(":", 1)[0] for k in flat}:
                    totals[name][0] += flat[f"{name}:sum"]
                    totals[name][1] += flat[f"{name}:count"]
                if not first:  # sanity (N+): before any update the ratio is 1 and the approx-KL 0
                    first = {"train/first_minibatch_ratio": flat["ratio_mean:sum"] / flat["ratio_mean:count"],
                             "train/first_minibatch_approx_kl": flat["approx_kl:sum"] / flat["approx_kl:count"]}
                step = self.optimizer_step()
                self.optimizer_steps += 1
                skipped += step.get("train/skipped_steps", 0.0)
                grad_norms.append(step["train/grad_norm"])
                lr = step["train/lr"]  # the lr of the last step taken, as every stage reports it
                self.after_optimizer_step()
        out = {f"train/{name}": total / count for name, (total, count) in totals.items() if count}
        if losses:
            out["train/loss"] = sum(losses) / len(losses)
            out["train/grad_norm"] = sum(grad_norms) / len(grad_norms)
        out["train/optimizer_steps"] = len(grad_norms)
        if skipped:
            out["train/skipped_steps"] = skipped
        out["train/lr"] = lr
        return {**out, **first}

    def rollout_metrics(self, scores: Scores, responses: list[list[int]]) -> dict[str, float]:
        """Reward, score, each reward function's mean and std, EOS rate and length of this step's samples, over
        every rank."""
        rewards = scores.rewards.double()
        functions = reward_function_totals(scores.per_function)
        total = distributed.sum_values({"n": len(responses), "reward": float(rewards.sum()),
                                        "reward_sq": float((rewards ** 2).sum()), "score": float(scores.raw.sum()),
                                        "eos": sum(scores.stopped), "length": sum(len(r) for r in responses),
                                        **{f"fn/{k}": v for k, v in functions.items()}})
        n, mean = total["n"], total["reward"] / total["n"]
        functions = {k[3:]: v for k, v in total.items() if k.startswith("fn/")}
        return {"train/reward_mean": mean, "train/reward_std": std_from_sums(n, total["reward"], total["reward_sq"]),
                "train/score_mean": total["score"] / n,
                "train/eos_rate": total["eos"] / n, "train/response_length": total["length"] / n,
                "train/rollout_sequences": n, **reward_function_metrics(functions, "train")}

    def close(self) -> None:
        engine = self.__dict__.pop("vllm_rollouts", None)
        if engine is not None:
            engine.close()  # the colocated engine's GPU memory returned, its process group gone
        self._sampling_copy = None
        super().close()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean reward of one sample per held-out prompt, drawn from a fresh generator with the same seed at
        every evaluation (so evaluations compare, and no training stream moves)."""
        prompt_ids = [x.prompt_ids for x in self.val_set]
        responses = self.sample(prompt_ids, 1, self.eval_policy, generator=self.random.fresh(1),
                                desc=f"{self.stage.name} eval: {len(prompt_ids)} answers")
        stopping.check_between_batches()  # the answers are made; scoring them can wait for the resumed run
        prompts = [ex.prompt for ex in self.val_examples]
        scores = self.score(prompts, responses, [ex.row for ex in self.val_examples])
        rewards, raw, stopped, texts = scores.rewards, scores.raw, scores.stopped, scores.texts
        items = [TokenizedSFT(p, r) for p, r in zip(prompt_ids, responses)]
        mask = response_mask(items, self.device)
        kl = None if self.reference is None else kl_penalty(
            self.rollout_logprobs(self.eval_policy, items), self.rollout_logprobs(self.reference, items), "k3")
        n = min(self.stage.get("num_samples") or 0, len(texts))
        if n:
            self.tracker.log_table([{"step": self.step, "prompt": prompts[i][-600:], "generation": texts[i],
                                     "reward": float(rewards[i]), "ends_with_eos": stopped[i],
                                     "length": len(responses[i])} for i in range(n)],
                                   f"samples/step_{self.step:06d}.json")
        return {"eval/reward_mean": float(rewards.mean()), "eval/score_mean": float(raw.mean()),
                "eval/eos_rate": sum(stopped) / len(stopped),
                "eval/response_length": sum(len(r) for r in responses) / len(responses),
                **reward_function_metrics(reward_function_totals(scores.per_function), "eval"),
                **({} if kl is None else {"eval/kl_k3": float((kl * mask).sum() / mask.sum().clamp(min=1))})}


def uses_reference(cfg: DictConfig) -> bool:
    """Whether GRPO / PPO hold a reference: a KL term to train with (kl_coef > 0), or report_kl."""
    return float(cfg.stage.kl_coef) > 0 or bool(cfg.stage.get("report_kl"))


def uses_reward_model(cfg: DictConfig) -> bool:
    """A trained reward model scores, as reward.fn or in reward.funcs: a path is set, or the scorer is named (a
    plan made before the RM exists)."""
    entries = [OmegaConf.select(cfg, "reward.fn", default=None), *(OmegaConf.select(cfg, "reward.funcs") or [])]
    return any(entry is not None and hasattr(entry, "get") and (
        bool(entry.get("path")) or str(entry.get("_target_") or "").endswith("RewardModelScorer")) for entry in entries)


def samples_from_a_copy(cfg: DictConfig) -> bool:
    """`OnlineRLTrainer.samples_from_a_copy` from the config: full fine-tuning, fp32 masters, 16-bit autocast, the
    built-in sampler, unsharded weights."""
    hardware = cfg.hardware
    return (hardware.precision != "fp32" and not hardware.lora.enabled and not hardware.load_in_4bit
            and hardware.get("master_weights", "fp32") == "fp32" and hardware.rollout_backend != "vllm"
            and not shards_weights(cfg.get("parallel") or {}))


def online_memory(cfg: DictConfig, stage_key: str, rollout_sequences: int, extra: list[HeldModel],
                  extra_activations: list[Activations] = ()) -> StageMemory:
    """Policy (trained), reference (unless LoRA: adapters disabled), the reward model when the reward is one,
    a rollout's KV cache, and one micro batch's activations through the policy."""
    micro = micro_batch(cfg, stage_key)
    prompt, _ = sequence_tokens(cfg)
    new = int(cfg.stage.generation.max_new_tokens)
    models = [HeldModel("policy", trains=True)]
    if not cfg.hardware.lora.enabled and uses_reference(cfg):
        models.append(frozen_reference(cfg))
    if samples_from_a_copy(cfg):
        models.append(HeldModel("sampling copy", weight_bytes=2))
    if uses_reward_model(cfg):  # a trained RM scores: in the compute dtype, or 4-bit (RewardModelScorer)
        models.append(HeldModel("reward model", shape="reward", reward_head=True, weight_bytes=compute_bytes(cfg)))
    return StageMemory(models + extra, [Activations("policy", "policy", micro, prompt + new, micro * new),
                                        *extra_activations], kv_cache=(rollout_sequences, prompt + new))
