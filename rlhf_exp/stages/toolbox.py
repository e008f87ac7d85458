"""What a stage uses besides the training loop: the run's device, precision and random streams, its tokenizer
and stop tokens, model loading and placement, the tokenized data, this process's share of a batch, scoring in
length order and sampling.

A `Trainer` (stages/base.py) holds one and so does `stage=eval`'s `PolicyEvaluator`, which trains nothing:
both reach these by composition, and nothing here knows of steps, checkpoints or the loop.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence, TypeVar

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from rlhf_exp import distributed, stopping
from rlhf_exp.data.batching import BatchStream, scores_in_length_order
from rlhf_exp.data.collate import collate_sft
from rlhf_exp.models.loading import frozen_copy, head_in_fp32, upcast_trainable
from rlhf_exp.models.peft import AdaptersDisabled, is_4bit, is_peft, merged_float_copy, uses_lora
from rlhf_exp.ops.logprobs import response_logprobs
from rlhf_exp.ops.shared_prefix import can_pack, packed_response_logprobs, repeats_a_prompt
from rlhf_exp.rollout import sample
from rlhf_exp.runtime import RandomStreams, dtype_of, make_runtime
from rlhf_exp.stages import stage_spec
from rlhf_exp.stages.spec import micro_batch
from rlhf_exp.tracking import Tracker

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class StageData:
    """A stage's data, tokenized: the training set, the held-out set (cut to stage.eval_examples), their texts
    and rows, the digests a resumed run compares, and the resumable stream of training batches."""

    train_set: list
    val_set: list
    train_examples: list
    val_examples: list
    splits: dict[str, dict[str, Any]]  # split -> {rows, digest}
    batches: BatchStream


class Toolbox:
    """The run's facts and the operations every stage shares, for one config and one tracker."""

    def __init__(self, cfg: DictConfig, tracker: Tracker):
        self.cfg, self.stage, self.tracker = cfg, cfg.stage, tracker
        self.spec = stage_spec(cfg.stage.name)
        self.runtime = make_runtime(cfg.hardware)
        self.random = RandomStreams(cfg.seed, self.runtime.device)
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.tokenizer = None
        self.stop_token_ids: list[int] = []

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def lora(self) -> bool:
        return uses_lora(self.cfg.hardware)

    @property
    def model_cfg(self) -> DictConfig:
        """cfg.model, pointed at the checkpoint when resuming (with LoRA: the base, plus the saved adapters)."""
        if not self.stage.get("resume_from"):
            return self.cfg.model
        model_cfg = OmegaConf.create(OmegaConf.to_container(self.cfg.model, resolve=True))
        if self.lora:
            model_cfg.adapter_from = self.stage.resume_from
        else:
            model_cfg.init_from = self.stage.resume_from
        return model_cfg

    # ------------------------------------------------------------------ models
    def load_tokenizer(self) -> None:
        """The tokenizer the data is written with (data.chat_template applied) and the ids that end a response."""
        from rlhf_exp.data import data_tokenizer

        self.tokenizer, self.stop_token_ids = data_tokenizer(self.model_cfg, self.cfg.data, self.cfg.paths.cache_dir)

    def load_policy(self) -> torch.nn.Module:
        """The trainable causal LM on the device: full weights, or 4-bit / LoRA as the hardware profile says."""
        from rlhf_exp.models import load_causal_lm

        return self.trainable(load_causal_lm(self.model_cfg, self.cfg.paths.cache_dir, self.tokenizer,
                                             self.cfg.hardware))

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` on the run's device; a 4-bit model is already where bitsandbytes put it."""
        return model if is_4bit(model) else model.to(self.device)

    def trainable(self, model: torch.nn.Module) -> torch.nn.Module:
        """A model that trains, on the device, its trainable weights in fp32 (hardware.master_weights=fp32);
        under autocast a frozen 16-bit LM head (LoRA's base) is kept in fp32 too (log-probs from fp32 logits)."""
        model = self.place(model)
        if self.runtime.precision != "fp32":
            head_in_fp32(model)
        return upcast_trainable(model) if self.cfg.hardware.master_weights == "fp32" else model

    def frozen_reference(self, policy: torch.nn.Module) -> torch.nn.Module:
        """The starting policy, frozen: with LoRA the policy itself with adapters disabled (no copy), else a copy
        that computes as the policy does (`frozen_copy`: linear weights in the compute dtype, the rest in the
        policy's master dtype; reloaded from the start when resuming, since the policy has moved)."""
        if is_peft(policy):
            return AdaptersDisabled(policy).eval()
        from rlhf_exp.models import load_causal_lm

        start = policy if not self.stage.get("resume_from") else load_causal_lm(
            self.cfg.model, self.cfg.paths.cache_dir, self.tokenizer).to(self.device)
        masters = torch.float32 if self.cfg.hardware.master_weights == "fp32" else dtype_of(self.cfg.model.dtype)
        return frozen_copy(start, self.runtime.compute_dtype, masters)

    def merge_policy(self, policy: torch.nn.Module) -> torch.nn.Module:
        """`policy`'s LoRA adapters merged into a float copy of the base."""
        from rlhf_exp.models import load_causal_lm

        return merged_float_copy(policy, lambda: load_causal_lm(self.cfg.model, self.cfg.paths.cache_dir,
                                                                self.tokenizer), self.cfg.hardware)

    # ------------------------------------------------------------------ data
    def load_data(self, kind: str) -> StageData:
        """The tokenizer, then the (train, held-out) split of `kind` ("sft", "preference", "unpaired" (KTO's
        labelled responses), or "prompt": prompts to sample from, with their references where the data has them),
        tokenized."""
        from rlhf_exp.data import load_preference_splits, load_prompt_splits, load_sft_splits, load_unpaired_splits
        from rlhf_exp.data.collate import split_digest, texts_of, tokenize_examples
        from rlhf_exp.data.formats import data_name
        from rlhf_exp.redact import redact_text
        from rlhf_exp.data.disk_cache import digest

        data = self.cfg.data
        self.load_tokenizer()
        load = {"sft": load_sft_splits, "preference": load_preference_splits, "prompt": load_prompt_splits,
                "unpaired": load_unpaired_splits}[kind]
        skipped: Counter[str] = Counter()
        train, val = load(data, self.tokenizer, self.cfg.seed, skipped, self.cfg.paths.cache_dir)
        self.report_skipped(skipped)
        # the held-out digest covers the whole split (stage.eval_examples may change on resume)
        held_out = {"rows": len(val), "digest": digest("\0".join(texts_of(ex)) for ex in val)}
        if self.stage.get("eval_examples"):
            val = val[: self.stage.eval_examples]
        tokenize = partial(tokenize_examples, tokenizer=self.tokenizer, max_prompt_tokens=data.max_prompt_tokens,
                           max_response_tokens=data.max_response_tokens, end_id=self.stop_token_ids[-1])
        train_set = tokenize(train, cache_dir=self.cfg.paths.cache_dir)
        val_set = tokenize(val)
        self.tracker.set_tags({"data.num_train": len(train_set), "data.num_eval": len(val_set)})
        splits = {"train": {"rows": len(train_set), "digest": split_digest(train_set)}, "held-out": held_out}
        # a path or hub id can hold a token (a signed URL, a folder named after one): redacted like the params
        source = redact_text(f"{data.source}:{data.path}" if data.get("path") else f"{data.source}:{data.name}")
        for context, split in splits.items():  # the run's inputs (MLflow's Datasets), whose digests resume checks
            self.tracker.log_dataset(redact_text(data_name(data)), split["digest"], source, context, split["rows"])
        return StageData(train_set, val_set, train, val, splits, BatchStream(len(train_set), self.cfg.seed))

    def report_skipped(self, skipped: Counter) -> None:
        """Bad rows dropped under data.on_bad_row=skip: counted per reason on the console and in MLflow."""
        if not skipped:
            return
        log.warning("data.on_bad_row=skip dropped %d rows: %s", sum(skipped.values()),
                    ", ".join(f"{reason}: {n}" for reason, n in skipped.most_common()))
        self.tracker.log_metrics({"data/skipped_rows": float(sum(skipped.values()))}, step=0)
        self.tracker.set_tags({"data.skipped." + re.sub(r"\W+", "_", reason).strip("_"): n
                               for reason, n in skipped.items()})

    def shard(self, items: Sequence[T]) -> Sequence[T]:
        """This process's share of a global batch (all of it in a single process)."""
        return items[self.rank::self.world_size]

    def micro_batch_size(self, use: str | None = None) -> int:
        """Sequences per forward: hardware.micro_batch_size.<the stage's key> (or <use>, e.g. "eval")."""
        return micro_batch(self.cfg, use or self.spec.micro_batch)

    # ------------------------------------------------------------------ passes over models
    @torch.no_grad()
    def score_in_length_order(self, model, items: Sequence[T], length, score_chunk, desc: str | None = None):
        """`score_chunk(list of items) -> tensor [n, ...]` over eval micro batches of similar length
        (less padding), with `model` in eval mode; rows come back in the items' order."""
        was_training = model.training
        model.eval()
        out = scores_in_length_order(items, length, score_chunk, self.micro_batch_size("eval"),
                                     lambda c: stopping.until_stopped(tqdm(c, desc=desc, leave=False,
                                                                           disable=desc is None)))
        model.train(was_training)
        return out

    def response_logprobs(self, model, items: Sequence, temperature: float = 1.0, with_entropy: bool = False):
        """(log-probs [B, R], mask [B, R], entropy [B, R] or None) of each item's response (items: prompt_ids,
        response_ids), in the run's precision; entries past a response's end are 0. Items that share a prompt
        share one row (its tokens run once) where the model's attention takes a block mask; otherwise one
        right-padded row each (no real token sees a pad, so no attention mask)."""
        with self.runtime.autocast():
            if repeats_a_prompt(items) and can_pack(model):
                return packed_response_logprobs(model, items, self.tokenizer.pad_token_id, self.device,
                                                temperature, with_entropy)
            batch = collate_sft(items, self.tokenizer.pad_token_id)
            return response_logprobs(model, batch["input_ids"].to(self.device),
                                     torch.tensor([len(x.prompt_ids) for x in items]),
                                     torch.tensor([len(x.response_ids) for x in items]), temperature, with_entropy)

    def sample(self, model, prompt_ids: Sequence[Sequence[int]], samples: int,
               generator: torch.Generator | None = None, desc: str | None = None) -> list[list[int]]:
        """`samples` responses per prompt from `model`, drawn from `generator` (the run's rollout generator
        unless given): nothing else's randomness moves them. `desc`: a progress bar (on the main process)."""
        return sample(model, prompt_ids, samples, self.stage.generation,
                      pad_token_id=self.tokenizer.pad_token_id, stop_token_ids=self.stop_token_ids,
                      generator=generator if generator is not None else self.random.rollout,
                      autocast=self.runtime.autocast(), desc=desc if distributed.is_main() else None)

    def log_samples(self, model, examples: Sequence, prompt_ids: Sequence[Sequence[int]], step: int) -> None:
        """Generate for the first stage.num_samples held-out prompts; log prompt, reference, sample."""
        n = self.stage.get("num_samples") or 0
        if not n:
            return
        responses = self.sample(model, prompt_ids[:n], 1, generator=self.random.fresh(step),
                                desc=f"{self.stage.name}: {n} samples")
        rows = [{"step": step, "prompt": ex.prompt[-600:],
                 "reference": getattr(ex, "completion", None) or getattr(ex, "chosen", ""),
                 "generation": self.tokenizer.decode(r, skip_special_tokens=True),
                 "ends_with_eos": bool(r) and r[-1] in self.stop_token_ids, "length": len(r)}
                for ex, r in zip(examples, responses)]
        self.tracker.log_table(rows, f"samples/step_{step:06d}.json")
