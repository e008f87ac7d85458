"""The loop every stage that trains runs: setup -> fit (train_step / evaluate / save_checkpoint) -> close.

A stage subclasses `Trainer` and supplies three methods (the protocol; torchtune's recipe interface is the
model): `setup_data_and_model` (data through `prepare_data`, `self.model` through `self.tools`),
`train_step` (one optimizer step, "train/..." metrics) and `evaluate` ("eval/..." metrics, no training
random stream moved). The hooks below them have defaults a stage overrides where it holds more (a
reference, an EMA, a critic, state a resume needs).

What the stages share besides the loop is `self.tools` (stages/toolbox.py: models, data, sampling,
scoring). The loop uses the engine (backward and optimizer step: autograd, fp16's scaler or DeepSpeed;
`rlhf_exp.engine`), checkpoints (`rlhf_exp.checkpoint`: model, tokenizer and `trainer_state.pt` with the
optimizer, schedule, random states, data position, step and metric history; `stage.resume_from=<checkpoint>`
continues from it) and peak-memory measurement (`rlhf_exp.memory`).
"""

from __future__ import annotations

import gc
import json
import logging
import math
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from rlhf_exp import checkpoint, distributed, stopping, vocabulary
from rlhf_exp.checkpoint_layout import BEST, BEST_RECORD, FINAL, MERGED, checkpoints_of, step_checkpoint
from rlhf_exp.data.formats import data_label
from rlhf_exp.engine import Engine
from rlhf_exp.errors import ConfigError, NonFiniteError
from rlhf_exp.evaluation.figures import close, curves_figure
from rlhf_exp.memory import PeakMemory
from rlhf_exp.models import enable_activation_checkpointing
from rlhf_exp.models.loading import disable_dropout
from rlhf_exp.ops.shared_prefix import masked_attention_kernels
from rlhf_exp.redact import redact
from rlhf_exp.runtime import rng_state, seed_everything, set_rng_state
from rlhf_exp.stages.spec import StageRunner, evaluation_line, metric_direction
from rlhf_exp.stages.toolbox import Toolbox
from rlhf_exp.tracking import Tracker

log = logging.getLogger(__name__)


class Trainer(StageRunner):
    """Base class of the stage trainers: the loop, its checkpoints and its metric history."""

    #: metrics drawn in the training-curve PNG logged at the end
    curve_metrics: tuple[str, ...] = ("train/loss", "eval/loss")

    def __init__(self, cfg: DictConfig, tracker: Tracker, run_dir: str | Path, memory_plan=None):
        """`memory_plan` (a planner.Plan, made by the launcher): reported beside the measured peak at the end."""
        self.cfg, self.stage, self.tracker = cfg, cfg.stage, tracker
        self.tools = Toolbox(cfg, tracker)
        self.spec, self.world_size = self.tools.spec, self.tools.world_size
        self.run_dir = Path(run_dir)
        self.memory = PeakMemory(self.device, memory_plan)
        self.last_checkpoint: Path | None = None  # what a run stopped by a NaN leaves to resume from
        self.data_changed_on_resume = False  # resumed on other data, as data.allow_changed_on_resume allows
        self.eval_pending = False  # an evaluation a stop signal cut short: the resumed run makes it first
        self.step = 0
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.last_metrics: dict[str, float] = {}
        self.model = self.engine = self.batches = None
        self.data_splits: dict | None = None

    # ------------------------------------------------------------------ what a stage supplies
    def setup_data_and_model(self) -> None:
        """Load the data (`prepare_data`) and self.model (the trainable policy: `self.tools.load_policy()`)."""
        raise NotImplementedError

    def train_step(self) -> dict[str, float]:
        """One optimizer step over stage.batch_size sequences; returns "train/..." metrics."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics ("eval/..."), without changing any training random stream."""
        raise NotImplementedError

    # ------------------------------------------------------------------ hooks with defaults
    def held_models(self) -> list[torch.nn.Module]:
        """Every model the stage runs (dropout is turned off in all of them when model.disable_dropout)."""
        return [m for m in (self.model, getattr(self, "reference", None), getattr(self, "ema", None)) if m is not None]

    def total_optimizer_steps(self) -> int:
        """Optimizer steps in the whole run (the lr schedule's length); RL stages take several per step."""
        return self.stage.max_steps

    def budget_spent(self) -> bool:
        """Whether a budget other than stage.max_steps ends training now (GRPO: generated tokens)."""
        return False

    def extra_state(self) -> dict[str, Any]:
        """Stage-specific state a resumed run needs (DPO: the reference log-probs)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def write_extra_files(self, folder: Path) -> None:
        """Stage-specific files written into the checkpoint folder before it is moved into place (PPO: the EMA)."""

    def on_train_end(self) -> None:
        """Last changes to the model before the final checkpoint (the RM stores its reward mean)."""

    @contextmanager
    def as_finished_model(self) -> Iterator[None]:
        """The model as a final checkpoint holds it, for a checkpoint saved mid-run (the RM: normalized)."""
        yield

    def merged_model(self) -> torch.nn.Module:
        """The policy's adapters merged into a float copy of the base; stages with other models override."""
        return self.tools.merge_policy(self.model)

    def plotted_metrics(self) -> list[str]:
        """What training_curves.png shows: `curve_metrics`, and what a run adds (each reward function's)."""
        return list(self.curve_metrics)

    # ------------------------------------------------------------------ the run's facts (self.tools holds them)
    @property
    def device(self) -> torch.device:
        return self.tools.device

    @property
    def runtime(self):
        return self.tools.runtime

    @property
    def random(self):
        return self.tools.random

    @property
    def tokenizer(self):
        return self.tools.tokenizer

    @property
    def stop_token_ids(self) -> list[int]:
        return self.tools.stop_token_ids

    @property
    def lora(self) -> bool:
        return self.tools.lora

    @property
    def optimizer(self):
        return self.engine.optimizer

    @property
    def scheduler(self):
        return self.engine.scheduler

    def prepare_data(self, kind: str) -> None:
        """The tokenized (train, held-out) split of `kind` ("sft", "preference", "unpaired" or "prompt"; Toolbox.load_data):
        self.train_set, self.val_set, their texts and rows (self.train_examples, self.val_examples) and
        self.batches, the resumable stream of training batches."""
        data = self.tools.load_data(kind)
        self.train_set, self.val_set, self.batches = data.train_set, data.val_set, data.batches
        self.train_examples, self.val_examples, self.data_splits = data.train_examples, data.val_examples, data.splits
        self.memory.start()  # what the models and training add is measured from here

    def sample(self, prompt_ids: Sequence[Sequence[int]], samples: int, model=None,
               generator: torch.Generator | None = None, desc: str | None = None) -> list[list[int]]:
        """`samples` responses per prompt from `model` (the policy unless given); see Toolbox.sample."""
        return self.tools.sample(model if model is not None else self.model, prompt_ids, samples, generator, desc)

    def log_samples(self, model, examples: Sequence, prompt_ids: Sequence[Sequence[int]]) -> None:
        self.tools.log_samples(model, examples, prompt_ids, self.step)

    def longest_sequences(self) -> tuple[int, int | None] | None:
        items = [*getattr(self, "train_set", []), *getattr(self, "val_set", [])]
        if not items:
            return None
        prompt = max(len(item.prompt_ids) for item in items)
        responses = [len(ids) for item in items for ids in
                     ((item.chosen_ids, item.rejected_ids) if hasattr(item, "chosen_ids") else (item.response_ids,))]
        return prompt, max(responses)

    # ------------------------------------------------------------------ the loop
    def setup(self) -> None:
        seed_everything(self.cfg.seed)
        self.setup_data_and_model()
        if self.cfg.model.get("disable_dropout"):
            for model in self.held_models():
                disable_dropout(model)
        if self.cfg.hardware.get("gradient_checkpointing"):
            enable_activation_checkpointing(self.model)
        parallel = self.cfg.get("parallel") or {}
        if parallel:
            self.model = distributed.shard_model(self.model, parallel)
        self.engine = Engine(self.model, self.stage, self.cfg.hardware, parallel, self.runtime.precision, self.device,
                             self.total_optimizer_steps())
        if self.stage.get("resume_from"):
            self.load_trainer_state(Path(self.stage.resume_from))

    def prepare(self) -> None:
        """Data, models and the resumed checkpoint (`setup`), once, before the tracker run opens."""
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
            while self.step < max_steps and not self.budget_spent():
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
                    self.save_checkpoint(step_checkpoint(self.run_dir, self.step))
        if evaluated_at != self.step:
            self.evaluate_unless_stopped(started_at)
        self.log_memory()
        self.on_train_end()
        if self.world_size > 1:  # every replica must have taken the same steps
            digests = distributed.gather_objects(distributed.parameter_digest(self.model))
            self.tracker.set_tags({"dist.world_size": self.world_size, "dist.parameter_digests": ",".join(digests)})
            self.log({"dist/replicas_identical": float(len(set(digests)) == 1)})
        final = self.save_checkpoint(checkpoints_of(self.run_dir) / FINAL)
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
        folder = checkpoints_of(self.run_dir) / BEST
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

    def stop_if_signalled(self, started_at: int) -> None:
        """After SIGTERM / SIGINT (any rank's): checkpoint here, at a step boundary, and raise RunStopped."""
        signum = stopping.received()
        if self.world_size > 1:
            signum = next((s for s in distributed.gather_objects(signum) if s), None)
        if signum is None:
            return
        folder = step_checkpoint(self.run_dir, self.step)
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

    # ------------------------------------------------------------------ what the run logs
    def log(self, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.history[name].append((self.step, float(value)))
        self.last_metrics.update(metrics)
        self.tracker.log_metrics(metrics, step=self.step)

    def log_memory(self) -> None:
        """Measured peak memory of models + training (from after data loading), beside the plan."""
        metrics, table = self.memory.report()
        if table is not None:
            self.tracker.log_text(table, "memory_plan.txt")
        self.log(metrics)

    def log_curves(self) -> None:
        fig = curves_figure(self.history, self.plotted_metrics(), f"{self.stage.name}: {self.cfg.model.name} "
                            f"on {data_label(self.cfg.data)}")
        try:
            fig.savefig(self.run_dir / "training_curves.png")
            self.tracker.log_figure(fig, "plots/training_curves.png")
        finally:
            close(fig)

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
            "data": self.data_splits,
            "eval_pending": self.eval_pending,
        }

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

    def load_trainer_state(self, folder: Path) -> None:
        state = checkpoint.load_trainer_state(folder)
        self.data_changed_on_resume = checkpoint.check_same_data(state.get("data"), self.data_splits, self.cfg.data,
                                                                 folder)
        # checkpoints written before the engine was its own part kept these two at the top level
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

    def close(self) -> None:
        """Free the models so the next run in this process starts clean."""
        if self.engine is not None:
            self.engine.close()
        self.model = self.engine = None
        gc.collect()
