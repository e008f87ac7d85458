"""The loop every stage runs: setup -> fit (train_step / evaluate / save_checkpoint) -> close.

A stage subclasses `Trainer` and writes `setup_data_and_model`, `train_step` and `evaluate`. The parts
the loop uses live beside it: the engine (backward and optimizer step: autograd, fp16's scaler or
DeepSpeed; `rlhf_exp.engine`), checkpoints (`rlhf_exp.checkpoint`), peak-memory measurement
(`rlhf_exp.memory`), the resumable batch stream (`rlhf_exp.data.batching`) and the run's own random
generators (`rlhf_exp.runtime.RandomStreams`). A checkpoint holds the model and tokenizer, and
`trainer_state.pt` with the optimizer, schedule, random states, data position, step and metric
history; `stage.resume_from=<checkpoint>` continues from it.
"""

from __future__ import annotations

import gc
import logging
import math
import json
import re
from collections import Counter, defaultdict
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from rlhf_exp import checkpoint, distributed, stopping, vocabulary
from rlhf_exp.data.batching import BatchStream, scores_in_length_order
from rlhf_exp.data.formats import data_label
from rlhf_exp.engine import Engine
from rlhf_exp.errors import ConfigError, NonFiniteError
from rlhf_exp.memory import PeakMemory
from rlhf_exp.redact import redact
from rlhf_exp.models.loading import disable_dropout, frozen_copy, head_in_fp32, upcast_trainable
from rlhf_exp.checkpoint_layout import MERGED
from rlhf_exp.models.peft import AdaptersDisabled, is_4bit, is_peft, merged_float_copy, uses_lora
from rlhf_exp.ops.shared_prefix import masked_attention_kernels
from rlhf_exp.rollout import sample
from rlhf_exp.runtime import RandomStreams, dtype_of, make_runtime, rng_state, seed_everything, set_rng_state
from rlhf_exp.stages import stage_spec
from rlhf_exp.stages.spec import StageSpec, metric_direction
from rlhf_exp.tracking import Tracker
from rlhf_exp.evaluation.figures import close, curves_figure

log = logging.getLogger(__name__)
T = TypeVar("T")

BEST = "best"              # checkpoints/best: the best evaluation's weights (stage.keep_best)
BEST_RECORD = "best.json"  # in it: step, metric, direction, value


def evaluation_line(metrics: dict[str, float], spec: StageSpec) -> str:
    """"loss 2.31 · perplexity 10.1": the stage's objective and report metrics, in that order."""
    keys = dict.fromkeys([spec.objective[0], *spec.report_metrics, "eval/accuracy", "eval/kl_k3"])
    shown = [k for k in keys if k in metrics] or sorted(metrics)[:4]
    return " · ".join(f"{k.split('/', 1)[-1]} {metrics[k]:.4g}" for k in shown)


class Trainer:
    """Base class of the stage trainers."""

    #: metrics drawn in the training-curve PNG logged at the end
    curve_metrics: tuple[str, ...] = ("train/loss", "eval/loss")

    def __init__(self, cfg: DictConfig, tracker: Tracker, run_dir: str | Path, memory_plan=None):
        """`memory_plan` (a planner.Plan, made by the launcher): reported beside the measured peak at the end."""
        self.cfg, self.stage, self.tracker = cfg, cfg.stage, tracker
        self.spec = stage_spec(cfg.stage.name)
        self.run_dir = Path(run_dir)
        self.runtime = make_runtime(cfg.hardware)
        self.random = RandomStreams(cfg.seed, self.runtime.device)
        self.memory = PeakMemory(self.runtime.device, memory_plan)
        self.last_checkpoint: Path | None = None  # what a run stopped by a NaN leaves to resume from
        self.data_changed_on_resume = False  # resumed on other data, as data.allow_changed_on_resume allows
        self.eval_pending = False  # an evaluation a stop signal cut short: the resumed run makes it first
        self.step = 0
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.last_metrics: dict[str, float] = {}
        self.model = self.tokenizer = self.engine = self.batches = None
        self.stop_token_ids: list[int] = []
        self.rank, self.world_size = distributed.rank(), distributed.world_size()

    # ------------------------------------------------------------------ what a stage writes
    def setup_data_and_model(self) -> None:
        """Load tokenizer, data (self.batches over the training set) and self.model."""
        raise NotImplementedError

    def train_step(self) -> dict[str, float]:
        """One optimizer step over stage.batch_size sequences; returns "train/..." metrics."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics ("eval/..."), without changing any training random stream."""
        raise NotImplementedError

    def held_models(self) -> list[torch.nn.Module]:
        """Every model the stage runs (dropout is turned off in all of them when model.disable_dropout)."""
        return [m for m in (self.model, getattr(self, "reference", None), getattr(self, "ema", None)) if m is not None]

    # ------------------------------------------------------------------ shared
    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def lora(self) -> bool:
        return uses_lora(self.cfg.hardware)

    @property
    def optimizer(self):
        return self.engine.optimizer

    @property
    def scheduler(self):
        return self.engine.scheduler

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

    def shard(self, items: Sequence[T]) -> Sequence[T]:
        """This process's share of a global batch (all of it in a single process)."""
        return items[self.rank::self.world_size]

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

    def micro_batch_size(self, use: str | None = None) -> int:
        """Sequences per forward: hardware.micro_batch_size.<the stage's key> (or <use>, e.g. "eval")."""
        from rlhf_exp.stages.spec import micro_batch

        return micro_batch(self.cfg, use or self.spec.micro_batch)

    def total_optimizer_steps(self) -> int:
        """Optimizer steps in the whole run (the lr schedule's length); RL stages take several per step."""
        return self.stage.max_steps

    def prepare_data(self, kind: str) -> None:
        """Tokenizer, then the (train, held-out) split of `kind` ("sft" or "preference"), tokenized.

        ("prompt": prompts to sample from, with their references where the data has them.)
        Sets self.tokenizer, self.stop_token_ids, self.train_set, self.val_set (held-out, cut to
        stage.eval_examples), self.train_examples and self.val_examples (their texts and rows) and self.batches.
        """
        from rlhf_exp.data import data_tokenizer, load_preference_splits, load_prompt_splits, load_sft_splits
        from rlhf_exp.data.collate import split_digest, texts_of, tokenize_examples
        from rlhf_exp.data.disk_cache import digest

        data = self.cfg.data
        self.tokenizer, self.stop_token_ids = data_tokenizer(self.model_cfg, data, self.cfg.paths.cache_dir)
        load = {"sft": load_sft_splits, "preference": load_preference_splits, "prompt": load_prompt_splits}[kind]
        skipped: Counter[str] = Counter()
        train, val = load(data, self.tokenizer, self.cfg.seed, skipped, self.cfg.paths.cache_dir)
        self.report_skipped(skipped)
        # the held-out digest covers the whole split (stage.eval_examples may change on resume)
        held_out = {"rows": len(val), "digest": digest("\0".join(texts_of(ex)) for ex in val)}
        if self.stage.get("eval_examples"):
            val = val[: self.stage.eval_examples]
        tokenize = partial(tokenize_examples, tokenizer=self.tokenizer, max_prompt_tokens=data.max_prompt_tokens,
                           max_response_tokens=data.max_response_tokens, end_id=self.stop_token_ids[-1])
        self.train_set = tokenize(train, cache_dir=self.cfg.paths.cache_dir)
        self.val_set = tokenize(val)
        self.train_examples, self.val_examples = train, val  # their texts and data rows
        self.data_splits = {"train": {"rows": len(self.train_set), "digest": split_digest(self.train_set)},
                            "held-out": held_out}
        self.batches = BatchStream(len(self.train_set), self.cfg.seed)
        self.tracker.set_tags({"data.num_train": len(self.train_set), "data.num_eval": len(self.val_set)})
        self.memory.start()  # what the models and training add is measured from here

    def longest_sequences(self) -> tuple[int, int | None] | None:
        """(the longest prompt, the longest response with its end token, or None where responses are generated)
        in the training and held-out data, in tokens; None before the data has loaded."""
        items = [*getattr(self, "train_set", []), *getattr(self, "val_set", [])]
        if not items:
            return None
        prompt = max(len(item.prompt_ids) for item in items)
        responses = [len(ids) for item in items for ids in
                     ((item.chosen_ids, item.rejected_ids) if hasattr(item, "chosen_ids") else (item.response_ids,))]
        return prompt, max(responses)

    def report_skipped(self, skipped: Counter) -> None:
        """Bad rows dropped under data.on_bad_row=skip: counted per reason on the console and in MLflow."""
        if not skipped:
            return
        log.warning("data.on_bad_row=skip dropped %d rows: %s", sum(skipped.values()),
                    ", ".join(f"{reason}: {n}" for reason, n in skipped.most_common()))
        self.tracker.log_metrics({"data/skipped_rows": float(sum(skipped.values()))}, step=0)
        self.tracker.set_tags({"data.skipped." + re.sub(r"\W+", "_", reason).strip("_"): n
                               for reason, n in skipped.items()})

    def setup(self) -> None:
        seed_everything(self.cfg.seed)
        self.setup_data_and_model()
        if self.cfg.model.get("disable_dropout"):
            for model in self.held_models():
                disable_dropout(model)
        if self.cfg.hardware.get("gradient_checkpointing"):
            self.model.gradient_checkpointing_enable()
        parallel = self.cfg.get("parallel") or {}
        if parallel:
            self.model = distributed.shard_model(self.model, parallel)
        self.engine = Engine(self.model, self.stage, self.cfg.hardware, parallel, self.runtime.precision, self.device,
                             self.total_optimizer_steps())
        if self.stage.get("resume_from"):
            self.load_trainer_state(Path(self.stage.resume_from))

    def prepare(self) -> None:
        """What can fail on the user's input, done before the tracker run opens (or reopens, on resume): data,
        models, the resumed checkpoint (`setup`). Once."""
        if self.engine is None:
            self.setup()

    def fit(self) -> dict[str, float]:
        self.prepare()
        max_steps, eval_every = self.stage.max_steps, self.stage.eval_every
        evaluated_at = started_at = self.step
        if self.step == 0 or self.eval_pending:  # step-0 figures: the gain is visible against them
            self.evaluate_unless_stopped(started_at)
        with tqdm(total=max_steps, initial=self.step, desc=f"{self.stage.name}", unit="step",
                  dynamic_ncols=True) as bar:
            while self.step < max_steps:
                self.stop_if_signalled(started_at)
                metrics = self.checked(self.train_step)
                self.step += 1
                self.log(metrics)
                bar.update(1)
                bar.set_postfix({name: f"{value:.4g}" for name, value in vocabulary.shown("bar", metrics).items()})
                if eval_every and self.step % eval_every == 0:
                    self.evaluate_unless_stopped(started_at)
                    evaluated_at = self.step
                if self.stage.get("save_every") and self.step % self.stage.save_every == 0 and self.step < max_steps:
                    self.save_checkpoint(self.run_dir / "checkpoints" / f"step_{self.step:06d}")
        if evaluated_at != self.step:
            self.evaluate_unless_stopped(started_at)
        self.log_memory()
        self.on_train_end()
        if self.world_size > 1:  # every replica must have taken the same steps
            digests = distributed.gather_objects(distributed.parameter_digest(self.model))
            self.tracker.set_tags({"dist.world_size": self.world_size, "dist.parameter_digests": ",".join(digests)})
            self.log({"dist/replicas_identical": float(len(set(digests)) == 1)})
        final = self.save_checkpoint(self.run_dir / "checkpoints" / "final")
        if self.lora and self.cfg.hardware.lora.merge_on_save and distributed.is_main():
            self.export_merged(final / MERGED)
        self.tracker.set_tags({"checkpoint_dir": str(final)})
        if distributed.is_main():
            self.log_curves()
        return dict(self.last_metrics)

    def evaluate_unless_stopped(self, started_at: int) -> None:
        """The held-out evaluation at this step; a stop signal during it abandons it at its next batch, and the
        run stops at this step with the evaluation left for the resumed run to make first."""
        self.eval_pending = True
        try:
            metrics = self.evaluate()
        except stopping.PassInterrupted:
            self.stop_if_signalled(started_at)
            raise
        self.eval_pending = False
        self.after_evaluation(metrics)

    def after_evaluation(self, metrics: dict[str, float]) -> None:
        """Log held-out metrics, say the ones a person watches in one line, and keep the best checkpoint."""
        self.log(metrics)
        if distributed.is_main():
            log.info("%s step %d/%d held-out: %s", self.stage.name, self.step, self.stage.max_steps,
                     evaluation_line(metrics, self.spec))
        if self.stage.get("keep_best") and self.step > 0:
            self.keep_if_best(metrics)

    def keep_if_best(self, metrics: dict[str, float]) -> None:
        """checkpoints/best: the weights of the best evaluation after step 0 by stage.best_metric (the stage's
        objective by default), replaced when a later one is strictly better. It holds no optimizer state,
        so resuming uses the step checkpoints; the earlier values come from the metric history, which a
        resumed run restores."""
        metric, direction = metric_direction(self.spec, self.stage.get("best_metric"))
        if metric not in metrics:
            raise ConfigError("stage.best_metric", f"{metric} is not a held-out metric of stage "
                              f"{self.stage.name}; it reports {', '.join(sorted(metrics))}")
        value = float(metrics[metric])
        earlier = [v for s, v in self.history[metric][:-1] if 0 < s < self.step and math.isfinite(v)]
        improved = not earlier or (value > max(earlier) if direction == "max" else value < min(earlier))
        # rank 0 decides: under FSDP / ZeRO-3 every rank must join the save's gather, or none
        if not distributed.broadcast_object(math.isfinite(value) and improved):
            return
        folder = self.run_dir / "checkpoints" / BEST
        record = {"step": self.step, "metric": metric, "direction": direction, "value": value}
        with self.as_finished_model():
            checkpoint.save(folder, model=self.model, tokenizer=self.tokenizer, engine=self.engine,
                            trainer_state=self.trainer_state, training_state=False,
                            extra_files=lambda staging: (self.write_extra_files(staging),
                                                         (staging / BEST_RECORD).write_text(json.dumps(record))))
            if self.lora and self.cfg.hardware.lora.merge_on_save and distributed.is_main():
                self.export_merged(folder / MERGED)
        self.tracker.set_tags({"best_checkpoint_dir": str(folder), "best.step": self.step, "best.metric": metric,
                               "best.value": f"{value:.6g}"})
        log.info("best %s so far (%.4g at step %d): %s", metric, value, self.step, folder)

    @contextmanager
    def as_finished_model(self) -> Iterator[None]:
        """The model as a final checkpoint holds it, for a checkpoint saved mid-run (the RM: normalized)."""
        yield

    def stop_if_signalled(self, started_at: int) -> None:
        """After SIGTERM / SIGINT (any rank's): checkpoint here, at a step boundary, and raise RunStopped."""
        signum = stopping.received()
        if self.world_size > 1:
            signum = next((s for s in distributed.gather_objects(signum) if s), None)
        if signum is None:
            return
        folder = self.run_dir / "checkpoints" / f"step_{self.step:06d}"
        if self.step > started_at and self.last_checkpoint != folder:
            self.save_checkpoint(folder)
        raise stopping.RunStopped(signum, self.step, self.last_checkpoint or self.stage.get("resume_from"))

    def checked(self, train_step) -> dict[str, float]:
        """One training step under stage.on_nonfinite: a non-finite gradient norm (the engine, before the
        update) or loss stops the run naming the step, with nothing written after the last finite checkpoint."""
        last = self.last_checkpoint or self.stage.get("resume_from")
        try:
            with masked_attention_kernels():  # no cuDNN attention: NaN gradients under packed masks
                metrics = train_step()
        except NonFiniteError as error:
            raise error.at_step(self.step + 1, last) from None
        loss = metrics.get("train/loss")
        if self.engine.on_nonfinite == "stop" and loss is not None and not math.isfinite(loss):
            raise NonFiniteError("train/loss", loss, self.step + 1, last)
        return metrics

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def optimizer_step(self) -> dict[str, float]:
        return self.engine.step()

    def log_memory(self) -> None:
        """Measured peak memory of models + training (from after data loading), beside the plan."""
        metrics, table = self.memory.report()
        if table is not None:
            self.tracker.log_text(table, "memory_plan.txt")
        self.log(metrics)

    def on_train_end(self) -> None:
        """Last changes to the model before the final checkpoint (the RM stores its reward mean)."""

    def log(self, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.history[name].append((self.step, float(value)))
        self.last_metrics.update(metrics)
        self.tracker.log_metrics(metrics, step=self.step)

    def plotted_metrics(self) -> list[str]:
        """What training_curves.png shows: `curve_metrics`, and what a run adds (each reward function's)."""
        return list(self.curve_metrics)

    def log_curves(self) -> None:
        fig = curves_figure(self.history, self.plotted_metrics(), f"{self.stage.name}: {self.cfg.model.name} "
                            f"on {data_label(self.cfg.data)}")
        try:
            fig.savefig(self.run_dir / "training_curves.png")
            self.tracker.log_figure(fig, "plots/training_curves.png")
        finally:
            close(fig)

    def sample(self, prompt_ids: Sequence[Sequence[int]], samples: int, model=None,
               generator: torch.Generator | None = None, desc: str | None = None) -> list[list[int]]:
        """`samples` responses per prompt from `model` (the policy), drawn from `generator` (the run's
        rollout generator unless given): nothing else's randomness moves them. `desc`: a progress bar."""
        return sample(model if model is not None else self.model, prompt_ids, samples, self.stage.generation,
                      pad_token_id=self.tokenizer.pad_token_id, stop_token_ids=self.stop_token_ids,
                      generator=generator if generator is not None else self.random.rollout,
                      autocast=self.runtime.autocast(), desc=desc if distributed.is_main() else None)

    def log_samples(self, model, examples: Sequence, prompt_ids: Sequence[Sequence[int]]) -> None:
        """Generate for the first stage.num_samples held-out prompts; log prompt, reference, sample."""
        n = self.stage.get("num_samples") or 0
        if not n:
            return
        responses = self.sample(prompt_ids[:n], 1, model, generator=self.random.fresh(self.step),
                                desc=f"{self.stage.name}: {n} samples")
        rows = [{"step": self.step, "prompt": ex.prompt[-600:],
                 "reference": getattr(ex, "completion", None) or getattr(ex, "chosen", ""),
                 "generation": self.tokenizer.decode(r, skip_special_tokens=True),
                 "ends_with_eos": bool(r) and r[-1] in self.stop_token_ids, "length": len(r)}
                for ex, r in zip(examples, responses)]
        self.tracker.log_table(rows, f"samples/step_{self.step:06d}.json")

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self, engine_state: dict) -> dict[str, Any]:
        return {
            "step": self.step,
            "engine": engine_state,
            "batches": self.batches.state_dict(),
            "rng": rng_state(),
            "random": self.random.state_dict(),
            "history": dict(self.history),
            "config": redact(OmegaConf.to_container(self.cfg, resolve=True)),
            "extra": self.extra_state(),
            "data": getattr(self, "data_splits", None),
            "eval_pending": self.eval_pending,
        }

    def extra_state(self) -> dict[str, Any]:
        """Stage-specific state a resumed run needs (DPO: the reference log-probs)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def write_extra_files(self, folder: Path) -> None:
        """Stage-specific files written into the checkpoint folder before it is moved into place (PPO: the EMA)."""

    def save_checkpoint(self, folder: Path) -> Path:
        self.last_checkpoint = checkpoint.save(folder, model=self.model, tokenizer=self.tokenizer, engine=self.engine,
                                               trainer_state=self.trainer_state, extra_files=self.write_extra_files)
        if self.stage.get("keep_checkpoints") and distributed.is_main():
            checkpoint.prune_step_checkpoints(folder.parent, int(self.stage.keep_checkpoints))
        return self.last_checkpoint

    def export_merged(self, folder: Path) -> None:
        """A plain Hugging Face folder with the LoRA adapters merged into float base weights."""
        merged = self.merged_model()
        with checkpoint.written_into_place(folder) as staging:
            merged.save_pretrained(staging, safe_serialization=True)
            self.tokenizer.save_pretrained(staging)
        log.info("merged model: %s", folder)

    def merged_model(self) -> torch.nn.Module:
        """The policy's adapters merged into a float copy of the base; stages with other models override."""
        return self.merge_policy(self.model)

    def merge_policy(self, policy: torch.nn.Module) -> torch.nn.Module:
        from rlhf_exp.models import load_causal_lm

        return merged_float_copy(policy, lambda: load_causal_lm(self.cfg.model, self.cfg.paths.cache_dir,
                                                                self.tokenizer), self.cfg.hardware)

    def load_trainer_state(self, folder: Path) -> None:
        state = checkpoint.load_trainer_state(folder)
        # checkpoints written before the engine was its own part kept these two at the top level
        self.check_same_data(state.get("data"), folder)
        engine_state = state.get("engine") or {"optimizer": state["optimizer"], "scheduler": state["scheduler"]}
        self.engine.load_state_dict(engine_state, folder, (self.cfg.get("parallel") or {}).get("name", "ddp"))
        self.batches.load_state_dict(state["batches"], bool(self.cfg.data.get("allow_changed_on_resume")))
        self.history = defaultdict(list, state["history"])
        self.step = state["step"]
        self.eval_pending = bool(state.get("eval_pending", False))
        set_rng_state(state["rng"])
        if "random" in state:
            self.random.load_state_dict(state["random"])
        self.load_extra_state(state.get("extra", {}))
        log.info("resumed from %s at step %d", folder, self.step)

    def check_same_data(self, saved: dict | None, folder: Path) -> None:
        """Refuse to resume on data other than the checkpoint's (an edited file of the same path and row count
        used to go ahead silently), naming the data and each split that changed."""
        now = getattr(self, "data_splits", None)
        if not saved or not now:
            return
        changed = [f"the {split} split ({saved[split]['rows']} -> {now[split]['rows']} rows" +
                   (", other contents" if saved[split]["rows"] == now[split]["rows"] else "") + ")"
                   for split in now if split in saved and saved[split]["digest"] != now[split]["digest"]]
        self.data_changed_on_resume = bool(changed)
        if not changed:
            return
        if self.cfg.data.get("allow_changed_on_resume"):
            log.warning("resuming on changed data (data.allow_changed_on_resume=true): %s", " and ".join(changed))
            return
        data = self.cfg.data
        key, source = ("data.path", data.path) if data.get("path") else ("data", f"data={data.name}")
        raise ConfigError(key, f"{source} is not the data {folder} was trained on: {' and '.join(changed)} changed. "
                          "Resume on the data it trained on, or set data.allow_changed_on_resume=true to go on "
                          "with this data")

    def close(self) -> None:
        """Free the models so the next run in this process starts clean."""
        if self.engine is not None:
            self.engine.close()
        self.model = self.engine = None
        gc.collect()
