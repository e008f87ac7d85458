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
from functools import partial

import torch
from tqdm.auto import tqdm

from rlhf_exp.data import load_sft_splits
from rlhf_exp.data.collate import collate_sft, tokenize_sft
from rlhf_exp.losses import sft_loss
from rlhf_exp.models import load_causal_lm, load_tokenizer
from rlhf_exp.ops.logprobs import masked_next_token_logprobs
from rlhf_exp.rollout import generate
from rlhf_exp.stages.base import BatchStream, Trainer, chunks


class SFTTrainer(Trainer):
    def setup_data_and_model(self) -> None:
        cfg = self.cfg
        self.tokenizer = load_tokenizer(self.model_cfg, cfg.paths.cache_dir)
        train, val = load_sft_splits(cfg.data, self.tokenizer, cfg.seed)
        if self.stage.eval_examples:
            val = val[: self.stage.eval_examples]
        tokenize = partial(tokenize_sft, tokenizer=self.tokenizer, max_prompt_tokens=cfg.data.max_prompt_tokens,
                           max_response_tokens=cfg.data.max_response_tokens)
        self.train_set = [tokenize(ex) for ex in tqdm(train, desc="tokenize train", leave=False)]
        self.val_examples = val
        self.val_set = [tokenize(ex) for ex in val]
        self.batches = BatchStream(len(self.train_set), cfg.seed)
        self.model = load_causal_lm(self.model_cfg, cfg.paths.cache_dir, self.tokenizer).to(self.device)
        self.tracker.set_tags({"data.num_train": len(self.train_set), "data.num_eval": len(self.val_set)})

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
        micro_batches = [collate_sft(c, self.tokenizer.pad_token_id) for c in chunks(items, self.micro_batch_size())]
        num_tokens = sum(int(b["response_mask"][:, 1:].sum()) for b in micro_batches)
        lr = self.scheduler.get_last_lr()[0]
        loss_sum = 0.0
        for batch in micro_batches:
            logps, mask = self._response_logps(batch)
            loss = sft_loss(logps, mask, num_tokens)
            loss.backward()
            loss_sum += loss.item()
        max_norm = self.stage.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        all_tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
        return {"train/loss": loss_sum, "train/grad_norm": float(grad_norm), "train/lr": lr,
                "train/tokens_per_s": all_tokens / seconds, "train/step_seconds": seconds}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        nll, count = 0.0, 0
        for chunk in chunks(self.val_set, self.micro_batch_size("eval")):
            logps, mask = self._response_logps(collate_sft(chunk, self.tokenizer.pad_token_id))
            nll -= float((logps * mask).sum())
            count += int(mask.sum())
        self.model.train()
        loss = nll / max(count, 1)
        self._log_samples()
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}

    def _log_samples(self) -> None:
        n = self.stage.num_samples
        if not n:
            return
        gen = self.stage.generation
        # Sampling must not move the training RNG, or evaluating would change training.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + self.step)
            responses = generate(self.model, self.tokenizer, [x.prompt_ids for x in self.val_set[:n]],
                                 max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_k=gen.top_k,
                                 top_p=gen.top_p, autocast=self.runtime.autocast())
        eos = self.tokenizer.eos_token_id
        rows = [{"step": self.step, "prompt": ex.prompt[-600:], "reference": ex.completion,
                 "generation": self.tokenizer.decode(r, skip_special_tokens=True),
                 "ends_with_eos": bool(r) and r[-1] == eos, "length": len(r)}
                for ex, r in zip(self.val_examples, responses)]
        self.tracker.log_table(rows, f"samples/step_{self.step:06d}.json")
