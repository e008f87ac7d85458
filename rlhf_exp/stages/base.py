"""The loop every stage shares: setup -> fit (train_step / evaluate / save_checkpoint) -> close.

A stage subclasses `Trainer` and writes `setup_data_and_model`, `train_step` and `evaluate`.
Everything that makes a run resumable lives here: a checkpoint holds the model (safetensors)
and tokenizer, and `trainer_state.pt` with optimizer, scheduler, RNG, data position, step and
metric history; `stage.resume_from=<checkpoint>` continues from it.
"""

from __future__ import annotations

import copy
import gc
import logging
import shutil
from collections import defaultdict
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from rlhf_exp import distributed
from rlhf_exp.errors import ConfigError, DiskFullError, is_disk_full
from rlhf_exp.models.peft import MERGED, AdaptersDisabled, is_4bit, is_peft, merged_float_copy, uses_lora
from rlhf_exp.optim import build_optimizer, build_scheduler
from rlhf_exp.rollout import generate
from rlhf_exp.runtime import (make_runtime, peak_memory, reset_peak_memory, rng_state, seed_everything,
                              set_rng_state)
from rlhf_exp.tracking import Tracker
from rlhf_exp.tracking.plots import close, curves_figure

log = logging.getLogger(__name__)
T = TypeVar("T")

TRAINER_STATE = "trainer_state.pt"
DEEPSPEED_STATE = "deepspeed"  # parallel=deepspeed_*: DeepSpeed's partitioned optimizer checkpoint


def staging_folder(folder: Path) -> Path:
    return folder.with_name(folder.name + ".partial")


@contextmanager
def written_into_place(folder: Path) -> Iterator[Path]:
    """Yields `<folder>.partial` to write into and renames it to `folder` when the block ends, so a run
    that dies mid-write leaves the previous `folder` whole. A failed write removes the partial folder
    (a full disk is then reported in one line, with the space left)."""
    staging = staging_folder(folder)
    staging.mkdir(parents=True, exist_ok=True)
    try:
        yield staging
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(error):
            raise DiskFullError(folder, shutil.disk_usage(folder.parent).free) from error
        raise
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def length_order(items: Sequence[T], length) -> list[int]:
    """Indices of `items` from shortest to longest: chunks of similar length waste less padding.
    Scores computed in this order go back with `unsorted[order] = scores`."""
    return sorted(range(len(items)), key=lambda i: length(items[i]))


class BatchStream:
    """An endless stream of example indices, reshuffled each epoch from (seed, epoch).

    Its position (epoch, cursor) is part of the checkpoint, so a resumed run sees exactly the
    examples the uninterrupted run would have seen.
    """

    def __init__(self, size: int, seed: int):
        if size <= 0:
            raise ValueError("no training examples")
        self.size, self.seed, self.epoch, self.cursor = size, seed, 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def take(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if self.cursor == self.size:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self._order[self.cursor])
            self.cursor += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["size"] != self.size:
            raise ConfigError("stage.resume_from", f"checkpoint was made on {state['size']} training examples, "
                              f"this run has {self.size}: the data config differs")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation()


class Trainer:
    """Base class of the stage trainers."""

    #: metrics drawn in the training-curve PNG logged at the end
    curve_metrics: tuple[str, ...] = ("train/loss", "eval/loss")

    def __init__(self, cfg: DictConfig, tracker: Tracker, run_dir: str | Path):
        self.cfg, self.stage, self.tracker = cfg, cfg.stage, tracker
        self.run_dir = Path(run_dir)
        self.runtime = make_runtime(cfg.hardware)
        self.step = 0
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.last_metrics: dict[str, float] = {}
        self.model = self.tokenizer = self.optimizer = self.scheduler = self.batches = None
        self.memory_baseline = float("nan")
        self.engine = None  # DeepSpeed's engine under parallel=deepspeed_* with several processes
        self.rank, self.world_size = distributed.rank(), distributed.world_size()

    # ------------------------------------------------------------------ what a stage writes
    def setup_data_and_model(self) -> None:
        """Load tokenizer, data (self.batches over the training set) and self.model."""
        raise NotImplementedError

    def train_step(self) -> dict[str, float]:
        """One optimizer step over stage.batch_size sequences; returns "train/..." metrics."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics ("eval/..."), without changing the training RNG stream."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
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

    def load_policy(self) -> torch.nn.Module:
        """The trainable causal LM on the device: full weights, or 4-bit / LoRA as the hardware profile says."""
        from rlhf_exp.models import load_causal_lm

        return self.place(load_causal_lm(self.model_cfg, self.cfg.paths.cache_dir, self.tokenizer, self.cfg.hardware))

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` on the run's device; a 4-bit model is already where bitsandbytes put it."""
        return model if is_4bit(model) else model.to(self.device)

    def frozen_reference(self, policy: torch.nn.Module) -> torch.nn.Module:
        """The starting policy, frozen: with LoRA the policy itself with adapters disabled (no copy),
        else a copy (reloaded from the start when resuming, since the policy has moved)."""
        if is_peft(policy):
            return AdaptersDisabled(policy).eval()
        from rlhf_exp.models import load_causal_lm

        start = policy if not self.stage.get("resume_from") else load_causal_lm(
            self.cfg.model, self.cfg.paths.cache_dir, self.tokenizer).to(self.device)
        return copy.deepcopy(start).eval().requires_grad_(False)

    def shard(self, items: Sequence[T]) -> Sequence[T]:
        """This process's share of a global batch (all of it in a single process)."""
        return items[self.rank::self.world_size]

    @torch.no_grad()
    def score_in_length_order(self, model, items: Sequence[T], length, score_chunk, desc: str | None = None):
        """`score_chunk(list of items) -> tensor [n, ...]` over eval micro batches of similar length
        (less padding), with `model` in eval mode; rows come back in the items' order."""
        was_training = model.training
        model.eval()
        order = length_order(items, length)
        parts = [score_chunk([items[i] for i in chunk]).float().cpu()
                 for chunk in tqdm(list(chunks(order, self.micro_batch_size("eval"))), desc=desc, leave=False,
                                   disable=desc is None)]
        model.train(was_training)
        if not parts:
            return torch.zeros(0)
        stacked = torch.cat(parts)
        out = torch.empty_like(stacked)
        out[order] = stacked
        return out

    def micro_batch_size(self, use: str | None = None) -> int:
        sizes = self.cfg.hardware.get("micro_batch_size") or {}
        return int(sizes.get(use or self.stage.name) or self.stage.batch_size)

    def total_optimizer_steps(self) -> int:
        """Optimizer steps in the whole run (the lr schedule's length); RL stages take several per step."""
        return self.stage.max_steps

    def prepare_data(self, kind: str) -> None:
        """Tokenizer, then the (train, held-out) split of `kind` ("sft" or "preference"), tokenized.

        Sets self.tokenizer, self.train_set, self.val_set (held-out, cut to stage.eval_examples),
        self.val_examples (their texts) and self.batches.
        """
        from rlhf_exp.data import load_preference_splits, load_sft_splits
        from rlhf_exp.data.collate import tokenize_pair, tokenize_sft
        from rlhf_exp.models import load_tokenizer

        data = self.cfg.data
        self.tokenizer = load_tokenizer(self.model_cfg, self.cfg.paths.cache_dir)
        load, tokenize = {"sft": (load_sft_splits, tokenize_sft),
                          "preference": (load_preference_splits, tokenize_pair)}[kind]
        train, val = load(data, self.tokenizer, self.cfg.seed)
        if self.stage.get("eval_examples"):
            val = val[: self.stage.eval_examples]
        tok = partial(tokenize, tokenizer=self.tokenizer, max_prompt_tokens=data.max_prompt_tokens,
                      max_response_tokens=data.max_response_tokens)
        self.train_set = [tok(ex) for ex in tqdm(train, desc="tokenize", leave=False)]
        self.val_set = [tok(ex) for ex in val]
        self.val_examples = val
        self.batches = BatchStream(len(self.train_set), self.cfg.seed)
        self.tracker.set_tags({"data.num_train": len(self.train_set), "data.num_eval": len(self.val_set)})
        self.memory_baseline = reset_peak_memory(self.device)  # what the models and training add is measured from here

    def setup(self) -> None:
        seed_everything(self.cfg.seed)
        self.setup_data_and_model()
        if self.cfg.hardware.get("gradient_checkpointing"):
            self.model.gradient_checkpointing_enable()
        parallel = self.cfg.get("parallel") or {}
        if parallel:
            self.model = distributed.shard_model(self.model, parallel)
        self.optimizer = build_optimizer(self.model, self.stage, self.cfg.hardware.optimizer,
                                         shard_states=bool(parallel.get("shard_optimizer")))
        self.scheduler = build_scheduler(self.optimizer, self.stage, self.total_optimizer_steps())
        if self.world_size > 1 and distributed.deepspeed_stage(parallel):
            self.engine = distributed.deepspeed_engine(self.model, self.optimizer, parallel, self.stage.max_grad_norm)
        if self.stage.get("resume_from"):
            self.load_trainer_state(Path(self.stage.resume_from))

    def fit(self) -> dict[str, float]:
        self.setup()
        max_steps, eval_every = self.stage.max_steps, self.stage.eval_every
        if self.step == 0:
            self.log(self.evaluate())  # step-0 figures: the gain is visible against them
        evaluated_at = self.step
        with tqdm(total=max_steps, initial=self.step, desc=f"{self.stage.name}", unit="step",
                  dynamic_ncols=True) as bar:
            while self.step < max_steps:
                metrics = self.train_step()
                self.step += 1
                self.log(metrics)
                bar.update(1)
                bar.set_postfix({k.split("/", 1)[1]: f"{v:.4g}" for k, v in metrics.items()
                                 if k in ("train/loss", "train/tokens_per_s")})
                if eval_every and self.step % eval_every == 0:
                    self.log(self.evaluate())
                    evaluated_at = self.step
                if self.stage.get("save_every") and self.step % self.stage.save_every == 0 and self.step < max_steps:
                    self.save_checkpoint(self.run_dir / "checkpoints" / f"step_{self.step:06d}")
        if evaluated_at != self.step:
            self.log(self.evaluate())
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

    def backward(self, loss: torch.Tensor) -> None:
        """Every stage's backward: autograd's, or DeepSpeed's (which reduces partitioned gradients)."""
        if self.engine is None:
            loss.backward()
        else:
            distributed.deepspeed_backward(self.engine, loss)

    def optimizer_step(self) -> dict[str, float]:
        """Clip, step, advance the schedule, zero the gradients; every stage's update ends here."""
        lr = self.scheduler.get_last_lr()[0]
        if self.engine is not None:  # DeepSpeed clips, steps its partitioned optimizer and zeroes
            self.engine.step()
            self.scheduler.step()
            return {"train/grad_norm": float(self.engine.get_global_grad_norm()), "train/lr": lr}
        distributed.sum_gradients(self.model)  # torchrun: the global batch's gradient on every rank
        max_norm = self.stage.max_grad_norm or float("inf")
        grad_norm = distributed.clip_grad_norm(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"train/grad_norm": float(grad_norm), "train/lr": lr}

    def log_memory(self) -> None:
        """Measured peak memory of models + training (from after data loading), beside the plan."""
        peak = peak_memory(self.device)
        metrics = {"memory/peak_gib": peak / 2**30, "memory/baseline_gib": self.memory_baseline / 2**30,
                   "memory/peak_over_baseline_gib": (peak - self.memory_baseline) / 2**30}
        try:
            from rlhf_exp.planner import plan_run

            plan = plan_run(self.cfg)
            metrics.update({"memory/planned_gib": plan.total_gib, "memory/planned_tensors_gib": plan.tensors_gib})
            self.tracker.log_text(plan.table(), "memory_plan.txt")
        except Exception:  # the plan is a report here; a gap in it must not fail a finished run
            log.exception("memory plan failed")
        self.log(metrics)

    def on_train_end(self) -> None:
        """Last changes to the model before the final checkpoint (the RM stores its reward mean)."""

    def log(self, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.history[name].append((self.step, float(value)))
        self.last_metrics.update(metrics)
        self.tracker.log_metrics(metrics, step=self.step)

    def log_curves(self) -> None:
        fig = curves_figure(self.history, list(self.curve_metrics), f"{self.stage.name}: {self.cfg.model.name} "
                            f"on {self.cfg.data.name}")
        try:
            fig.savefig(self.run_dir / "training_curves.png")
            self.tracker.log_figure(fig, "plots/training_curves.png")
        finally:
            close(fig)

    def log_samples(self, model, examples: Sequence, prompt_ids: Sequence[Sequence[int]]) -> None:
        """Generate for the first stage.num_samples held-out prompts; log prompt, reference, sample."""
        n = self.stage.get("num_samples") or 0
        if not n:
            return
        gen = self.stage.generation
        # Sampling must not move the training RNG, or evaluating would change training.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + self.step)
            responses = generate(model, self.tokenizer, prompt_ids[:n], max_new_tokens=gen.max_new_tokens,
                                 temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
                                 autocast=self.runtime.autocast())
        eos = self.tokenizer.eos_token_id
        rows = [{"step": self.step, "prompt": ex.prompt[-600:],
                 "reference": getattr(ex, "completion", None) or getattr(ex, "chosen", ""),
                 "generation": self.tokenizer.decode(r, skip_special_tokens=True),
                 "ends_with_eos": bool(r) and r[-1] == eos, "length": len(r)}
                for ex, r in zip(examples, responses)]
        self.tracker.log_table(rows, f"samples/step_{self.step:06d}.json")

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self, optimizer_state: dict | None = None) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict() if optimizer_state is None else optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "batches": self.batches.state_dict(),
            "rng": rng_state(),
            "history": dict(self.history),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "extra": self.extra_state(),
        }

    def extra_state(self) -> dict[str, Any]:
        """Stage-specific state a resumed run needs (DPO: the reference log-probs)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def save_checkpoint(self, folder: Path) -> Path:
        """Model (safetensors) + tokenizer + trainer_state.pt, written beside and renamed into place (rank 0).
        Sharded models and optimizers are gathered whole first (every rank takes part)."""
        staging = staging_folder(folder)
        if distributed.is_main():
            if staging.exists():  # left by a run that died mid-write
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        if self.engine is not None:
            model_state, optimizer_state = distributed.deepspeed_model_state(self.engine), {}
            distributed.barrier()  # the staging folder exists; every rank writes its partition into it
            self.engine.save_checkpoint(str(staging / DEEPSPEED_STATE), tag="state")
            distributed.barrier()
        else:
            model_state = distributed.full_model_state(self.model)
            optimizer_state = distributed.full_optimizer_state(self.model, self.optimizer)
        if not distributed.is_main():
            return folder
        with written_into_place(folder) as staging:
            if model_state is None:
                self.model.save_pretrained(staging, safe_serialization=True)
            else:
                distributed.save_gathered(self.model, staging, model_state)
            self.tokenizer.save_pretrained(staging)
            torch.save(self.trainer_state(optimizer_state), staging / TRAINER_STATE)
        log.info("checkpoint: %s", folder)
        return folder

    def export_merged(self, folder: Path) -> None:
        """A plain Hugging Face folder with the LoRA adapters merged into float base weights."""
        merged = self.merged_model()
        with written_into_place(folder) as staging:
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
        path = folder / TRAINER_STATE
        if not path.is_file():
            raise ConfigError("stage.resume_from", f"{folder} is not a checkpoint of this project (no {TRAINER_STATE})")
        state = torch.load(path, map_location="cpu", weights_only=False)
        made_by_deepspeed = (folder / DEEPSPEED_STATE).is_dir()
        if (self.engine is not None) != made_by_deepspeed:
            made = "a deepspeed_* parallel mode" if made_by_deepspeed else "a parallel mode other than DeepSpeed's"
            raise ConfigError("parallel", f"{folder}'s optimizer state was saved under {made} and does not load "
                              f"under parallel={self.cfg.parallel.name} here: resume under the mode that made it")
        if self.engine is not None:  # DeepSpeed's partitioned optimizer state (the weights came with the model)
            self.engine.load_checkpoint(str(folder / DEEPSPEED_STATE), tag="state", load_optimizer_states=True,
                                        load_lr_scheduler_states=False)
        else:
            distributed.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["batches"])
        self.history = defaultdict(list, state["history"])
        self.step = state["step"]
        set_rng_state(state["rng"])
        self.load_extra_state(state.get("extra", {}))
        log.info("resumed from %s at step %d", folder, self.step)

    def close(self) -> None:
        """Free the models so the next run in this process starts clean."""
        if self.engine is not None:
            self.engine.destroy()  # its hooks and communication buffers
        self.model = self.optimizer = self.scheduler = self.engine = None
        gc.collect()
