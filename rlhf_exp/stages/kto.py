"""Kahneman-Tversky optimization (KTO; Ethayarajh et al. 2024): a policy from responses judged one at a time,
desirable or undesirable, with no pairs needed, from an SFT checkpoint (`model.init_from`) or the base model.

Data: TRL's unpaired preference type (prompt, completion, label), or any preference data, each pair split into a
desirable and an undesirable example (TRL's unpair_preference_dataset); both halves stay on one side of the split.
Each step: stage.batch_size examples; the reference point z0 (the KL term) is estimated over the whole batch from
mismatched pairs, each prompt with the previous example's response (TRL's cycling), under the policy (no
gradient) and the frozen reference, then every example's loss against it (the loss: rlhf_exp/losses/preference.py).
Deviation: the reference is scored on the fly (no precomputed log-probs: z0's mismatched pairs depend on the batch).
One process: z0 is a mean over the whole batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from rlhf_exp.data.batching import chunks
from rlhf_exp.data.collate import TokenizedLabelled, TokenizedSFT
from rlhf_exp.evaluation.statistics import wilson_interval, win_scores
from rlhf_exp.losses import kto_loss
from rlhf_exp.losses.preference import kto_reference_point
from rlhf_exp.schema import Rule, StageConfig, key, non_negative, positive
from rlhf_exp.stages.base import Trainer
from rlhf_exp.stages.spec import Activations, HeldModel, StageMemory, StageSpec, frozen_reference, micro_batch, \
    sequence_tokens


@dataclass
class KTOConfig(StageConfig):
    beta: float = key(positive())
    desirable_weight: float = key(non_negative())    # lambda_D
    undesirable_weight: float = key(non_negative())  # lambda_U
    batch_size: int = key(Rule(lambda v: v >= 2, "must be >= 2 (the reference point pairs each prompt with "
                                                 "another example's response)"))


def mismatched(items: list[TokenizedLabelled]) -> list[TokenizedSFT]:
    """Each prompt with the previous example's response (the first with the last's): the pairs z0 is estimated
    on (TRL's `[completions[-1]] + completions[:-1]`)."""
    return [TokenizedSFT(item.prompt_ids, items[k - 1].response_ids) for k, item in enumerate(items)]


class KTOTrainer(Trainer):
    curve_metrics = ("train/loss", "eval/loss", "eval/label_accuracy", "eval/margin")

    def setup_data_and_model(self) -> None:
        self.prepare_data("unpaired")
        self.model = self.tools.load_policy()
        self.reference = self.tools.frozen_reference(self.model)

    def sequence_logps(self, model, items: list[TokenizedSFT]) -> torch.Tensor:
        """[B] response log-probs summed over response tokens."""
        logps, mask, _ = self.tools.response_logprobs(model, items)
        return (logps * mask).sum(-1).float()

    @torch.no_grad()
    def scored(self, model, items: list[TokenizedSFT]) -> torch.Tensor:
        size = self.tools.micro_batch_size()
        return torch.cat([self.sequence_logps(model, chunk) for chunk in chunks(items, size)])

    def reference_point(self, items: list[TokenizedLabelled]) -> torch.Tensor:
        pairs = mismatched(items)
        return kto_reference_point(self.scored(self.model, pairs), self.scored(self.reference, pairs))

    def losses(self, items: list[TokenizedLabelled], policy_logps: torch.Tensor, z0: torch.Tensor):
        desirable = torch.tensor([item.label for item in items], device=policy_logps.device)
        losses, rewards = kto_loss(policy_logps, self.scored(self.reference, items).to(policy_logps.device),
                                   desirable, z0, beta=self.stage.beta, desirable_weight=self.stage.desirable_weight,
                                   undesirable_weight=self.stage.undesirable_weight)
        return losses, rewards, desirable

    def train_step(self) -> dict[str, float]:
        start = time.perf_counter()
        items = [self.train_set[i] for i in self.batches.take(self.stage.batch_size)]
        z0 = self.reference_point(items)
        total, loss, rewards, labels = len(items), 0.0, [], []
        for chunk in chunks(items, self.tools.micro_batch_size()):
            losses, chunk_rewards, desirable = self.losses(chunk, self.sequence_logps(self.model, chunk), z0)
            self.backward(losses.sum() / total)
            loss += float(losses.detach().sum())
            rewards.append(chunk_rewards)
            labels.append(desirable)
        update = self.optimizer_step()
        return {"train/loss": loss / total, "train/reference_point": float(z0),
                **reward_metrics(torch.cat(rewards), torch.cat(labels), "train"), **update,
                "time/step_s": time.perf_counter() - start}

    def evaluate(self) -> dict[str, float]:
        items = list(self.val_set)
        z0 = self.reference_point(items)
        losses, rewards, desirable = self.losses(items, self.scored(self.model, items), z0)
        # on its label's side of the reference point (rewards are beta x the log-ratio, so the point is beta z0);
        # a tie (every example at step 0) counts half
        point = torch.full_like(rewards, float(self.stage.beta * z0))
        right = torch.where(desirable, win_scores(rewards, point), win_scores(point, rewards))
        low, high = wilson_interval(float(right.sum()), len(items))
        self.log_samples(self.model, self.val_examples, [item.prompt_ids for item in items])
        return {"eval/loss": float(losses.mean()), "eval/reference_point": float(z0),
                "eval/label_accuracy": float(right.mean()), "eval/label_accuracy_ci_low": low,
                "eval/label_accuracy_ci_high": high, **reward_metrics(rewards, desirable, "eval")}


def reward_metrics(rewards: torch.Tensor, desirable: torch.Tensor, split: str) -> dict[str, float]:
    """Mean implicit reward beta (log pi - log ref) of the desirable and the undesirable examples, and their gap
    (a side with no example in the batch is left out)."""
    out = {}
    if bool(desirable.any()):
        out[f"{split}/rewards_chosen"] = float(rewards[desirable].mean())
    if bool((~desirable).any()):
        out[f"{split}/rewards_rejected"] = float(rewards[~desirable].mean())
    if len(out) == 2:
        out[f"{split}/margin"] = out[f"{split}/rewards_chosen"] - out[f"{split}/rewards_rejected"]
    return out


def memory(cfg: DictConfig) -> StageMemory:
    micro = micro_batch(cfg, "kto")
    prompt, response = sequence_tokens(cfg)
    lora = cfg.hardware.lora.enabled
    models = [HeldModel("policy", trains=True)] + ([] if lora else [frozen_reference(cfg)])
    return StageMemory(models, [Activations("policy", "policy", micro, prompt + response, micro * response)],
                       notes=["KTO reference: " + ("adapters disabled (no copy)" if lora else "a frozen copy")])


STAGE = StageSpec(name="kto", config=KTOConfig, trainer=KTOTrainer, micro_batch="kto", memory=memory,
                  micro_batch_default=4, parallel_note="the reference point is a mean over the whole batch",
                  objective=("eval/loss", "min"),
                  report_metrics=("eval/loss", "eval/label_accuracy", "eval/margin"))
