"""Reward model (RM): a scalar head on a causal-LM backbone, trained with the Bradley-Terry loss.

Follows Stiennon et al. 2020 and Huang et al. 2024 ("The N+ implementation details"): head
`Linear(H, 1)` with N(0, 1/sqrt(H+1)) init and zero bias, score read at the EOS, loss
-log sigmoid(r_chosen - r_rejected) (optional margin, Llama 2), and after training the
mean score of the SFT reference responses is stored in the model and subtracted in forward.
Evaluation: held-out accuracy with a 95% Wilson interval, loss, score means, margin, and
calibration (ECE and a reliability plot); the step-0 (untrained head) figures are logged too.
Deviations: chosen and rejected share one forward pass, in one row behind their prompt
(`ops.shared_prefix`; a row each where the attention takes no block mask); the head has no bias
(TRL's and OpenRLHF's have none: under Bradley-Terry its gradient cancels, and the stored mean sets
the offset).
Saved as a standard `<Arch>ForSequenceClassification` folder with a pad token that is not the EOS, so
TRL, OpenRLHF and transformers load it and score the same position (models/reward.py). The model may be
such a classifier (`model.init_from`, or a hub id / folder in `model.path`; TRL's reward models too):
training goes on from its head.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from omegaconf import DictConfig

from rlhf_exp import distributed
from rlhf_exp.data import load_sft_splits
from rlhf_exp.data.batching import chunks
from rlhf_exp.data.collate import collate_pairs, collate_sft, tokenize_sft
from rlhf_exp.losses import bradley_terry_loss
from rlhf_exp.evaluation.statistics import calibration_bins, expected_calibration_error, wilson_interval
from rlhf_exp.models import load_causal_lm
from rlhf_exp.models.peft import merged_float_copy
from rlhf_exp.models.reward import RewardModel, add_reward_adapters, give_own_pad_token, grow_embeddings, load_reward_model, \
    load_score_head, record_end_token, reward_model_from_causal_lm, sequence_classifier_to_start_from
from rlhf_exp.ops.shared_prefix import can_pack, pack_by_prompt, packed_inputs
from rlhf_exp.schema import StageConfig, key, non_negative, positive
from rlhf_exp.stages.base import Trainer
from rlhf_exp.stages.spec import EVERY_PARALLEL_MODE, Activations, HeldModel, StageMemory, StageSpec, micro_batch, \
    sequence_tokens
from rlhf_exp.evaluation.figures import close, reliability_figure


@dataclass
class RMConfig(StageConfig):
    margin: float = key(non_negative())          # Bradley-Terry margin (Llama 2); 0: plain BT
    norm_examples: int = key(non_negative())     # SFT references whose mean score becomes the RM's zero
    calibration_bins: int = key(positive())


def pair_length(pair) -> int:
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


class RewardModelTrainer(Trainer):
    curve_metrics = ("train/loss", "eval/loss", "eval/accuracy")

    def setup_data_and_model(self) -> None:
        cfg = self.cfg
        self.prepare_data("preference")
        # The SFT references whose mean score becomes the model's zero (normalization).
        sft_train, _ = load_sft_splits(cfg.data, self.tokenizer, cfg.seed, cache_dir=cfg.paths.cache_dir)
        self.reference_set = [tokenize_sft(ex, self.tokenizer, cfg.data.max_prompt_tokens,
                                           cfg.data.max_response_tokens, self.stop_token_ids[-1])
                              for ex in sft_train[: self.stage.norm_examples]]
        resume = self.stage.get("resume_from")
        if resume and not self.lora:
            model = load_reward_model(resume, device=self.device)[0]
            give_own_pad_token(model.backbone, self.tokenizer)
        else:  # model.init_from may be a reward model (this project's, TRL's, a hub one saved locally): its head too
            causal_lm = load_causal_lm(self.cfg.model, cfg.paths.cache_dir, self.tokenizer, cfg.hardware, adapters=False)
            model = self.tools.place(reward_model_from_causal_lm(causal_lm))
            classifier = sequence_classifier_to_start_from(cfg.model)
            if classifier is not None:
                load_score_head(model, classifier)
            give_own_pad_token(model.backbone, self.tokenizer)
            if self.lora:  # adapters on the backbone; the head trains in full
                add_reward_adapters(model, cfg.hardware, resume)
        self.model = self.tools.trainable(model).train()
        record_end_token(self.model, self.tokenizer.convert_ids_to_tokens(self.stop_token_ids[-1]))
        self.tracker.set_tags({"rm.num_layers": self.model.config.num_hidden_layers})

    def pair_scores(self, pairs) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen scores [B], rejected scores [B]) from one forward over both: a pair is one row, prompt,
        chosen, rejected (the prompt runs once), where the attention takes a block mask."""
        if can_pack(self.model):
            packed = pack_by_prompt([p.chosen for p in pairs] + [p.rejected for p in pairs], self.tokenizer.pad_token_id)
            with self.runtime.autocast():
                scores = self.model.scores_at(packed.ends.to(self.device),
                                              **packed_inputs(self.model, packed, self.device))
            return scores[: len(pairs)], scores[len(pairs):]
        batch = collate_pairs(pairs, self.tokenizer.pad_token_id)
        with self.runtime.autocast():
            scores = self.model(batch["input_ids"].to(self.device), batch["lengths"])
        return scores[: len(pairs)], scores[len(pairs):]

    def train_step(self) -> dict[str, float]:
        start = time.perf_counter()
        pairs = sorted((self.train_set[i] for i in self.batches.take(self.stage.batch_size)), key=pair_length)
        total = len(pairs)
        loss_sum, right, margins, chosen_sum, rejected_sum = 0.0, 0, 0.0, 0.0, 0.0
        for chunk in chunks(self.tools.shard(pairs), self.tools.micro_batch_size()):
            chosen, rejected = self.pair_scores(chunk)
            loss = bradley_terry_loss(chosen, rejected, self.stage.margin).sum() / total
            self.backward(loss)
            loss_sum += loss.item()
            chosen, rejected = chosen.detach(), rejected.detach()
            right += int((chosen > rejected).sum())
            margins += float((chosen - rejected).sum())
            chosen_sum += float(chosen.sum())
            rejected_sum += float(rejected.sum())
        sums = distributed.sum_values({"loss": loss_sum, "right": right, "margin": margins, "chosen": chosen_sum,
                                       "rejected": rejected_sum})
        update = self.optimizer_step()
        return {"train/loss": sums["loss"], "train/accuracy": sums["right"] / total, "train/margin": sums["margin"] / total,
                "train/score_chosen": sums["chosen"] / total, "train/score_rejected": sums["rejected"] / total, **update,
                "time/step_s": time.perf_counter() - start}

    @torch.no_grad()
    def scores(self, pairs) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen [N], rejected [N]) scores of held-out pairs, in their order."""
        scores = self.tools.score_in_length_order(self.model, pairs, pair_length,
                                                  lambda chunk: torch.stack(self.pair_scores(chunk), dim=-1),
                                                  "score held-out pairs")
        return scores[:, 0], scores[:, 1]

    def evaluate(self) -> dict[str, float]:
        chosen, rejected = self.scores(self.val_set)
        n, right = len(chosen), int((chosen > rejected).sum())
        low, high = wilson_interval(right, n)
        prob_chosen = torch.sigmoid(chosen - rejected).tolist()
        table = calibration_bins(prob_chosen, self.stage.calibration_bins)
        fig = reliability_figure(table, f"RM calibration, step {self.step} ({n} held-out pairs)")
        try:
            self.tracker.log_figure(fig, f"plots/reliability_step_{self.step:06d}.png")
        finally:
            close(fig)
        return {"eval/loss": float(bradley_terry_loss(chosen, rejected, self.stage.margin).mean()),
                "eval/accuracy": right / n, "eval/accuracy_ci_low": low, "eval/accuracy_ci_high": high,
                "eval/score_chosen": float(chosen.mean()), "eval/score_rejected": float(rejected.mean()),
                "eval/margin": float((chosen - rejected).mean()), "eval/ece": expected_calibration_error(table)}

    def reference_scores(self) -> torch.Tensor:
        """Scores [N] of the SFT references (their mean becomes the model's zero)."""
        def score(chunk):
            batch = collate_sft(chunk, self.tokenizer.pad_token_id)
            with self.runtime.autocast():
                return self.model(batch["input_ids"].to(self.device), batch["lengths"])

        return self.tools.score_in_length_order(self.model, self.reference_set,
                                                lambda x: len(x.prompt_ids) + len(x.response_ids), score)

    def on_train_end(self) -> None:
        """Normalize: the SFT references' mean score becomes 0 in the saved model."""
        if not self.reference_set:
            return
        offset = float(self.reference_scores().mean())
        self.model.reward_mean += offset
        after = float(self.reference_scores().mean())
        self.log({"rm/norm_offset": float(self.model.reward_mean), "rm/reference_score_after_norm": after})
        self.tracker.set_tags({"rm.norm_offset": f"{float(self.model.reward_mean):.6g}"})

    @contextmanager
    def as_finished_model(self) -> Iterator[None]:
        """Normalized as on_train_end leaves it, while a best checkpoint is saved; training goes on unchanged."""
        before = self.model.reward_mean.clone()
        if self.reference_set:
            self.model.reward_mean += float(self.reference_scores().mean())
        try:
            yield
        finally:
            self.model.reward_mean.copy_(before)

    def merged_model(self) -> RewardModel:
        """The backbone's adapters merged into float weights, with the trained head and offset."""
        def float_backbone():
            backbone = load_causal_lm(self.cfg.model, self.cfg.paths.cache_dir, self.tokenizer).base_model
            grow_embeddings(backbone, len(self.tokenizer))  # the pad token's row, as the trained one has
            return backbone

        backbone = merged_float_copy(self.model.backbone, float_backbone, self.cfg.hardware, "FEATURE_EXTRACTION")
        merged = RewardModel(backbone, self.model.head.in_features)
        merged.head.load_state_dict(self.model.head.state_dict())
        merged.reward_mean.copy_(self.model.reward_mean)
        return merged


def memory(cfg: DictConfig) -> StageMemory:
    micro = micro_batch(cfg, "rm")
    prompt, response = sequence_tokens(cfg)
    return StageMemory([HeldModel("reward model", trains=True, reward_head=True)],
                       [Activations("reward model", "policy", 2 * micro, prompt + response, 0)])


STAGE = StageSpec(name="rm", config=RMConfig, trainer=RewardModelTrainer, micro_batch="rm", memory=memory,
                  init_from_reward_model=True, parallel=EVERY_PARALLEL_MODE, objective=("eval/accuracy", "max"),
                  report_metrics=("eval/accuracy", "eval/ece", "eval/margin"))
