"""This project's side: the stage's trainer, built from the config a run would compose, stepped directly."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from rlhf_exp.bench.workload import Workload


def micro_batch(stage: str, batch: int) -> int:
    """hardware=cpu's micro batch (what a user's run takes), or the largest below it that divides `batch`:
    accumulated to the same batch and update as TRL's one pass."""
    from rlhf_exp.config import compose_config

    default = int(compose_config(["hardware=cpu"]).hardware.micro_batch_size[stage])
    return max(size for size in range(1, min(default, batch) + 1) if batch % size == 0)


def overrides(stage: str, work: Workload, root: Path) -> list[str]:
    batch = work.batch[stage]
    common = [
        f"stage={stage}", "model=smollm2_135m", "model.source=local", f"model.path={work.model}",
        "model.tokenizer=null", "model.dtype=float32", "hardware=cpu", f"hardware.precision={work.precision}",
        f"hardware.num_threads={work.threads}", "hardware.check_memory_plan=false",
        "data=file", f"data.path={work.files[stage]}", f"data.max_prompt_tokens={work.max_prompt_tokens}",
        f"data.max_response_tokens={work.max_response_tokens}", "data.val_size=4",
        f"stage.max_steps={work.total_steps}", f"stage.lr={work.lr}", "stage.warmup_steps=0",
        "stage.weight_decay=0.0", "stage.adam_betas=[0.9,0.999]", "stage.max_grad_norm=1.0",
        "stage.eval_every=null", "stage.num_samples=0", f"paths.root_dir={root}",
    ]
    if stage in ("sft", "rm", "dpo"):
        common += [f"stage.batch_size={batch}", f"hardware.micro_batch_size.{stage}={micro_batch(stage, batch)}"]
    if stage == "sft":
        return common
    if stage == "rm":
        return common + ["stage.norm_examples=0"]
    if stage == "dpo":
        return common + [f"stage.beta={work.beta}",
                         "stage.precompute_ref_logps=false"]  # TRL's default: the reference runs every step
    rollout = batch * work.samples_per_prompt
    return common + [
        f"stage.batch_size={batch}", f"stage.samples_per_prompt={work.samples_per_prompt}",
        f"stage.minibatch_size={rollout}", f"hardware.micro_batch_size.grpo={rollout}", "stage.updates_per_rollout=1",
        f"stage.kl_coef={work.kl_coef}", f"stage.clip_ratio={work.clip_ratio}", "stage.dual_clip_c=null",
        "stage.loss_type=grpo", f"stage.generation.max_new_tokens={work.max_new_tokens}",
        f"stage.generation.temperature={work.temperature}", "reward=length",
        f"reward.fn.target_tokens={work.target_tokens}", "reward.missing_eos_score=null"]


def in_our_order(stage: str, work: Workload, tokenizer, folder: Path) -> str:
    """A copy of the stage's file holding the rows our trainer visits in the warm-up and timed steps, in
    the order it visits them (our split, then our seeded stream): TRL reads it sequentially, so step k is
    the same examples on both sides."""
    from rlhf_exp.config import compose_config
    from rlhf_exp.data import load_preference_splits, load_prompt_splits, load_sft_splits
    from rlhf_exp.data.batching import BatchStream

    cfg = compose_config(overrides(stage, work, folder))
    load = {"sft": load_sft_splits, "rm": load_preference_splits, "dpo": load_preference_splits,
            "grpo": load_prompt_splits}[stage]
    train, _ = load(cfg.data, tokenizer, cfg.seed)
    visits = BatchStream(len(train), cfg.seed).take(work.total_steps * work.batch[stage])
    lines = Path(work.files[stage]).read_text().splitlines()
    path = folder / f"{stage}_in_our_order.jsonl"
    path.write_text("".join(lines[int(train[i].origin.rsplit(":", 1)[1]) - 1] + "\n" for i in visits))
    return str(path)


def run(stage: str, work: Workload) -> dict:
    """Step times [s], and per step the tokens trained on and (GRPO) generated."""
    from rlhf_exp.config import compose_config, resolved, validate
    from rlhf_exp.stages import stage_spec
    from rlhf_exp.tracking.base import Tracker

    with tempfile.TemporaryDirectory() as root:
        cfg = resolved(compose_config(overrides(stage, work, Path(root))))
        validate(cfg)
        trainer = stage_spec(stage).trainer(cfg=cfg, tracker=Tracker(), run_dir=Path(root) / "run")
        trainer.setup()
        times, generated = [], []
        for _ in range(work.total_steps):
            start = time.perf_counter()
            metrics = trainer.train_step()
            times.append(time.perf_counter() - start)
            if stage == "grpo":
                generated.append(metrics["train/response_length"] * metrics["train/rollout_sequences"])
    return {"step_s": times, "generated_tokens": generated}
