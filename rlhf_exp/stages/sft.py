"""Supervised fine-tuning (SFT): next-token loss on the response tokens only.

Follows the TL;DR SFT of Stiennon et al. 2020 and "The N+ implementation details of RLHF
with PPO" (Huang et al. 2024): prompt and padding masked out of the loss, reference
`" " + summary + eos`, cosine schedule with warmup to a minimum lr.
Deviation: the loss is the token mean over the whole global batch (all micro batches of a
step), so the gradient does not depend on how the batch is split for memory.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from rlhf_exp import distributed, stopping
from rlhf_exp.data.batching import chunks, length_order
from rlhf_exp.data.collate import collate_sft
from rlhf_exp.losses import sft_loss
from rlhf_exp.ops.liger import fused_response_nll, liger_enabled
from rlhf_exp.ops.logprobs import masked_next_token_logprobs
from rlhf_exp.schema import StageConfig
from rlhf_exp.stages.base import Trainer
from rlhf_exp.stages.spec import EVERY_PARALLEL_MODE, Activations, HeldModel, StageMemory, StageSpec, micro_batch, \
    sequence_tokens


@dataclass
class SFTConfig(StageConfig):
    """SFT has only the keys every stage has (conf/stage/base/common.yaml)."""


class SFTTrainer(Trainer):
    def setup_data_and_model(self) -> None:
        self.prepare_data("sft")
        self.model = self.tools.load_policy()
        self.liger = liger_enabled(self.cfg.hardware)

    def _response_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p of each response token [B, T-1], 0 elsewhere; the mask of those targets [B, T-1])."""
        # Right padding + causal attention: no real token can see a pad, so the padding mask is
        # redundant, and leaving it out keeps attention on the fast causal path.
        with self.runtime.autocast():
            logps = masked_next_token_logprobs(self.model, batch["input_ids"].to(self.device), attention_mask=None,
                                               target_mask=batch["response_mask"].to(self.device))
        return logps, batch["response_mask"][:, 1:].to(self.device, logps.dtype)

    def train_step(self) -> dict[str, float]:
        start = time.perf_counter()
        items = [self.train_set[i] for i in self.batches.take(self.stage.batch_size)]
        # Similar lengths share a micro batch (less padding); the loss is normalized over the
        # whole global batch, so the order does not change the gradient.
        items.sort(key=lambda x: len(x.prompt_ids) + len(x.response_ids))
        # scored targets of the whole global batch (all ranks); a response at position 0 has no predictor
        num_tokens = sum(len(x.response_ids) - (not x.prompt_ids) for x in items)
        micro_batches = [collate_sft(c, self.tokenizer.pad_token_id)
                         for c in chunks(self.tools.shard(items), self.tools.micro_batch_size())]
        loss_sum = 0.0
        for batch in micro_batches:
            if self.liger:  # sft_loss's value from Liger's fused kernel: no logits kept for backward
                with self.runtime.autocast():
                    loss = fused_response_nll(self.model, batch["input_ids"].to(self.device),
                                              batch["response_mask"].to(self.device)) / num_tokens
            else:
                logps, mask = self._response_logps(batch)
                loss = sft_loss(logps, mask, num_tokens)
            self.backward(loss)
            loss_sum += loss.item()
        totals = distributed.sum_values({"loss": loss_sum, "tokens": sum(int(b["attention_mask"].sum())
                                                                         for b in micro_batches)})
        update = self.optimizer_step()
        seconds = time.perf_counter() - start
        return {"train/loss": totals["loss"], **update, "train/tokens_per_s": totals["tokens"] / seconds,
                "time/step_s": seconds}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        nll, count = 0.0, 0
        # similar lengths share a chunk: a fifth fewer tokens through the model on TL;DR (the sum does not depend on order)
        order = length_order(self.val_set, lambda x: len(x.prompt_ids) + len(x.response_ids))
        in_order = [self.val_set[i] for i in order]
        for chunk in stopping.until_stopped(tqdm(list(chunks(in_order, self.tools.micro_batch_size("eval"))),
                                                 desc="sft eval: held-out loss", leave=False,
                                                 disable=not distributed.is_main())):
            logps, mask = self._response_logps(collate_sft(chunk, self.tokenizer.pad_token_id))
            nll -= float((logps * mask).sum())
            count += int(mask.sum())
        self.model.train()
        loss = nll / max(count, 1)
        self.log_samples(self.model, self.val_examples, [x.prompt_ids for x in self.val_set])
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}


def memory(cfg: DictConfig) -> StageMemory:
    micro = micro_batch(cfg, "sft")
    prompt, response = sequence_tokens(cfg)
    return StageMemory([HeldModel("policy", trains=True)],
                       [Activations("policy", "policy", micro, prompt + response, micro * response)])


STAGE = StageSpec(name="sft", config=SFTConfig, trainer=SFTTrainer, micro_batch="sft", memory=memory,
                  parallel=EVERY_PARALLEL_MODE, disable_dropout=False,
                  report_metrics=("eval/loss", "eval/perplexity"))
