"""Direct preference optimization (DPO; Rafailov et al. 2023) with cDPO label smoothing, IPO
and hinge variants, and the reference-free SimPO and ORPO (`stage.loss_type`; the losses:
rlhf_exp/losses/preference.py), from an SFT checkpoint (`model.init_from`) or the base model.
SimPO and ORPO are loss types of this stage, not stages of their own, because they differ from DPO only in the
loss and in needing no reference: the pairs, the batching and the evaluation are the same.
IPO's default is TRL's length-normalized form (`ipo`: per-token average log-ratios, so its target
margin 1/(2 beta) means the same for short and long responses); `ipo_sum` is the summed form.

Reference log-probs: by default computed once before training (`stage.precompute_ref_logps`)
by the starting policy itself, for exactly the pairs the deterministic batch stream will
visit and for the held-out pairs, so no reference model stays in memory or runs per step.
`stage.precompute_ref_logps=false` keeps a frozen copy and scores each batch on the fly (with
LoRA: the policy with its adapters disabled, and precomputing is exact too, since fresh
adapters start at zero).
Log-probs are summed over response tokens only; a pair is one row, prompt, chosen, rejected, its prompt
run once (`ops.shared_prefix`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from rlhf_exp import distributed
from rlhf_exp.data.batching import BatchStream, chunks
from rlhf_exp.data import collate, disk_cache
from rlhf_exp.losses import dpo_loss
from rlhf_exp.losses.preference import DPO_LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES
from rlhf_exp.evaluation.statistics import wilson_interval, win_scores
from rlhf_exp.ops import logprobs, shared_prefix
from rlhf_exp.schema import StageConfig, in_range, key, non_negative, one_of, positive
from rlhf_exp.stages.base import Trainer
from rlhf_exp.stages.rm import pair_length
from rlhf_exp.stages.spec import EVERY_PARALLEL_MODE, Activations, HeldModel, StageMemory, StageSpec, \
    frozen_reference, micro_batch, sequence_tokens


@dataclass
class DPOConfig(StageConfig):
    beta: float = key(positive())
    label_smoothing: float = key(in_range(0, 0.5, "[)"))  # > 0: conservative DPO (cDPO)
    loss_type: str = key(one_of(DPO_LOSS_TYPES))
    precompute_ref_logps: bool = key()                   # false: keep a frozen reference, score every batch
    simpo_gamma: float = key(non_negative())             # SimPO's target margin


def pair_lengths(pairs) -> torch.Tensor:
    """[N, 2] response token counts (chosen, rejected): IPO averages log-ratios over them."""
    return torch.tensor([[len(p.chosen_ids), len(p.rejected_ids)] for p in pairs], dtype=torch.float32)


class DPOTrainer(Trainer):
    curve_metrics = ("train/loss", "eval/loss", "eval/implicit_accuracy", "eval/margin")

    def setup_data_and_model(self) -> None:
        self.prepare_data("preference")
        self.model = self.tools.load_policy()
        self.reference = None
        self.ref_train: dict[int, tuple[float, float]] = {}
        self.ref_val: torch.Tensor | None = None
        resuming = bool(self.stage.get("resume_from"))
        self.reference_free = self.stage.loss_type in REFERENCE_FREE_LOSS_TYPES
        if self.reference_free:
            return  # no reference to load or score
        if self.stage.precompute_ref_logps and not resuming:
            self._precompute_reference(self.model)  # the starting policy is the reference
        elif not self.stage.precompute_ref_logps:
            self.reference = self.tools.frozen_reference(self.model)

    # ------------------------------------------------------------------ log-probs
    def pair_logps(self, model, pairs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chosen [B], rejected [B]) summed response log-probs, and response lengths [2B]; a pair's prompt runs
        once (one row: prompt, chosen, rejected) where the model's attention takes a block mask."""
        logps, mask, _ = self.tools.response_logprobs(model, [p.chosen for p in pairs] + [p.rejected for p in pairs])
        sums = (logps * mask).sum(-1)
        return sums[: len(pairs)], sums[len(pairs):], mask.sum(-1)

    @torch.no_grad()
    def _score(self, model, pairs, desc: str) -> torch.Tensor:
        """[N, 2]: (chosen, rejected) summed log-probs of each pair, in the pairs' order."""
        if not pairs:
            return torch.zeros(0, 2)
        return self.tools.score_in_length_order(
            model, pairs, pair_length, lambda chunk: torch.stack(self.pair_logps(model, chunk)[:2], dim=-1), desc)

    def planned_visits(self) -> list[int]:
        """Training pairs the run's stage.max_steps will visit (the stream is deterministic)."""
        planned = BatchStream(len(self.train_set), self.cfg.seed)
        return sorted(set(planned.take(self.stage.max_steps * self.stage.batch_size)))

    def _precompute_reference(self, model, visit: list[int] | None = None, desc: str = "train") -> None:
        """Reference log-probs of the pairs training will visit (`visit`: only those; the held-out ones
        too when scoring all of them)."""
        whole = visit is None
        visit = self.planned_visits() if whole else visit
        scores = self._reference_scores(model, [self.train_set[i] for i in visit], f"reference log-probs ({desc})")
        self.ref_train.update({i: (float(c), float(r)) for i, (c, r) in zip(visit, scores)})
        if whole:
            self.ref_val = self._reference_scores(model, self.val_set, "reference log-probs (held-out)")

    def _reference_scores(self, model, pairs, desc: str) -> torch.Tensor:
        """`_score`, kept under paths.cache_dir: the jobs of a sweep over beta (or lr, loss type) start
        from one policy and visit the same pairs, so only the first scores them. Keyed by the weights,
        the pairs' tokens in order, the eval micro batch (padding), precision, device and this code."""
        def key_parts():
            yield "dpo-reference-logps-v1"
            yield disk_cache.weights_hash(model)
            yield f"{self.runtime.precision}:{self.device.type}:{self.tools.micro_batch_size('eval')}"
            yield from (Path(module.__file__).read_bytes() for module in (logprobs, shared_prefix, collate, sys.modules[__name__]))
            yield from (f"{p.prompt_ids}|{p.chosen_ids}|{p.rejected_ids}" for p in pairs)

        return disk_cache.cached_rows(self.cfg.paths.cache_dir if pairs else None, "reference_logps",
                                      key_parts(), lambda: self._score(model, pairs, desc))

    def reference_logps(self, indices: list[int], pairs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.reference_free:
            return None, None
        if self.reference is not None:
            with torch.no_grad():
                chosen, rejected, _ = self.pair_logps(self.reference, pairs)
            return chosen.float(), rejected.float()
        ref = torch.tensor([self.ref_train[i] for i in indices], device=self.device)
        return ref[:, 0], ref[:, 1]

    def extra_state(self) -> dict:
        return {"ref_train": self.ref_train, "ref_val": self.ref_val}

    def load_extra_state(self, state: dict) -> None:
        if not self.stage.precompute_ref_logps or self.reference_free:
            return
        if self.data_changed_on_resume:  # data.allow_changed_on_resume: the saved ones score other pairs
            reference = self.tools.frozen_reference(self.model)
            self.ref_train = {}
            self._precompute_reference(reference)
            del reference
            return
        self.ref_train, self.ref_val = dict(state["ref_train"]), state["ref_val"]
        added = [i for i in self.planned_visits() if i not in self.ref_train]
        if added:  # resumed with a larger stage.max_steps: score the new pairs under the starting policy
            reference = self.tools.frozen_reference(self.model)
            self._precompute_reference(reference, added, f"{len(added)} pairs of the added steps")
            del reference

    # ------------------------------------------------------------------ training
    def _losses(self, policy_chosen, policy_rejected, ref_chosen, ref_rejected, lengths: torch.Tensor,
                chosen_tokens_total: float | None = None):
        """Per-pair losses and implicit rewards; `chosen_tokens_total`: the whole batch's chosen tokens (ORPO's
        NLL is a mean over them, not over one micro batch's)."""
        lengths = lengths.to(policy_chosen.device)
        return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=self.stage.beta,
                        loss_type=self.stage.loss_type, label_smoothing=self.stage.label_smoothing,
                        chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1],
                        simpo_gamma=self.stage.simpo_gamma, chosen_tokens_total=chosen_tokens_total)

    def train_step(self) -> dict[str, float]:
        start = time.perf_counter()
        indices = self.batches.take(self.stage.batch_size)
        order = sorted(range(len(indices)), key=lambda k: pair_length(self.train_set[indices[k]]))
        indices = [indices[k] for k in order]
        total = len(indices)
        chosen_tokens = float(sum(len(self.train_set[i].chosen_ids) for i in indices))
        sums = dict(loss=0.0, right=0, chosen_reward=0.0, rejected_reward=0.0, chosen_logp=0.0, rejected_logp=0.0)
        for chunk in chunks(self.tools.shard(indices), self.tools.micro_batch_size()):
            pairs = [self.train_set[i] for i in chunk]
            chosen, rejected, _ = self.pair_logps(self.model, pairs)
            ref_chosen, ref_rejected = self.reference_logps(chunk, pairs)
            losses, chosen_rewards, rejected_rewards = self._losses(chosen, rejected, ref_chosen, ref_rejected,
                                                                    pair_lengths(pairs), chosen_tokens)
            self.backward(losses.sum() / total)
            sums["loss"] += float(losses.detach().sum())
            sums["right"] += float(win_scores(chosen_rewards.detach(), rejected_rewards.detach()).sum())
            sums["chosen_reward"] += float(chosen_rewards.sum())
            sums["rejected_reward"] += float(rejected_rewards.sum())
            sums["chosen_logp"] += float(chosen.detach().sum())
            sums["rejected_logp"] += float(rejected.detach().sum())
        sums = distributed.sum_values(sums)
        update = self.optimizer_step()
        return {"train/loss": sums["loss"] / total, "train/implicit_accuracy": sums["right"] / total,
                "train/rewards_chosen": sums["chosen_reward"] / total,
                "train/rewards_rejected": sums["rejected_reward"] / total,
                "train/margin": (sums["chosen_reward"] - sums["rejected_reward"]) / total,
                "train/logps_chosen": sums["chosen_logp"] / total, "train/logps_rejected": sums["rejected_logp"] / total,
                **update, "time/step_s": time.perf_counter() - start}

    def evaluate(self) -> dict[str, float]:
        policy = self._score(self.model, self.val_set, "held-out log-probs")
        lengths = pair_lengths(self.val_set)
        if self.reference_free:
            ref = None
            losses, chosen_rewards, rejected_rewards = self._losses(policy[:, 0], policy[:, 1], None, None, lengths)
        else:
            ref = self.ref_val if self.reference is None else self._score(self.reference, self.val_set, "reference")
            losses, chosen_rewards, rejected_rewards = self._losses(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1],
                                                                    lengths)
        # a tie (every pair at step 0, where the policy is its reference) counts half, as the judge's win rate does
        n, right = len(losses), float(win_scores(chosen_rewards, rejected_rewards).sum())
        low, high = wilson_interval(right, n)
        self.log_samples(self.model, self.val_examples, [p.prompt_ids for p in self.val_set])
        return {"eval/loss": float(losses.mean()), "eval/implicit_accuracy": right / n,
                "eval/implicit_accuracy_ci_low": low, "eval/implicit_accuracy_ci_high": high,
                "eval/rewards_chosen": float(chosen_rewards.mean()),
                "eval/rewards_rejected": float(rejected_rewards.mean()),
                "eval/margin": float((chosen_rewards - rejected_rewards).mean()),
                "eval/logps_chosen": float(policy[:, 0].mean()), "eval/logps_rejected": float(policy[:, 1].mean()),
                # how far the policy moved from the reference on held-out responses, per token (none held: SimPO, ORPO)
                **({} if ref is None else {"eval/abs_logratio_per_token": float(((policy - ref).abs() / lengths).mean())})}


def memory(cfg: DictConfig) -> StageMemory:
    micro = micro_batch(cfg, "dpo")
    prompt, response = sequence_tokens(cfg)
    precomputed, lora = cfg.stage.precompute_ref_logps, cfg.hardware.lora.enabled
    free = cfg.stage.loss_type in REFERENCE_FREE_LOSS_TYPES
    models = [HeldModel("policy", trains=True)] + ([] if precomputed or lora or free else [frozen_reference(cfg)])
    note = (f"none ({cfg.stage.loss_type} is reference-free)" if free
            else "precomputed log-probs, no model held" if precomputed
            else "adapters disabled (no copy)" if lora else "a frozen copy")
    return StageMemory(models, [Activations("policy", "policy", 2 * micro, prompt + response, 2 * micro * response)],
                       notes=[f"DPO reference: {note}"])


STAGE = StageSpec(name="dpo", config=DPOConfig, trainer=DPOTrainer, micro_batch="dpo", memory=memory,
                  micro_batch_default=2, parallel=EVERY_PARALLEL_MODE, objective=("eval/implicit_accuracy", "max"),
                  report_metrics=("eval/implicit_accuracy", "eval/margin", "eval/abs_logratio_per_token"))
