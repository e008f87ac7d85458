"""TRL's side: SFTTrainer, RewardTrainer, DPOTrainer and GRPOTrainer on the same model folder, texts and
settings (TRL comes with the `bench` extra, never with the package)."""

from __future__ import annotations

import tempfile
import time

from rlhf_exp.bench.workload import Workload


def step_timer():
    """A callback that records the wall time of every optimizer step (end to end, data and generation in)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.generated, self.last = [], [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.last is None:
                self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:  # GRPO: per step, over the step's completions
                self.generated.append(float(logs["completions/mean_length"]))

    return StepTimer()


def common_args(work: Workload, output_dir: str, batch: int) -> dict:
    return dict(output_dir=output_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                learning_rate=work.lr, max_steps=work.total_steps, warmup_steps=0, weight_decay=0.0,
                adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, optim="adamw_torch",
                lr_scheduler_type="constant", bf16=work.precision == "bf16", use_cpu=True, report_to="none",
                # TRL's configs default to gradient checkpointing (activations recomputed in backward: more work,
                # less memory); ours runs without it on CPU, so neither side does here
                gradient_checkpointing=False,
                logging_steps=1, save_strategy="no", eval_strategy="no", disable_tqdm=True, seed=0,
                dataloader_num_workers=0, train_sampling_strategy="sequential")


def run(stage: str, work: Workload) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # our visits in our order, read in order: step k trains on the same examples on both sides
    data = load_dataset("json", data_files=work.trl_files.get(stage, work.files[stage]), split="train")
    timer = step_timer()
    budget = work.max_prompt_tokens + work.max_response_tokens
    with tempfile.TemporaryDirectory() as out:
        args = common_args(work, out, work.batch[stage])
        if stage == "sft":
            from trl import SFTConfig, SFTTrainer

            model = AutoModelForCausalLM.from_pretrained(work.model, dtype=torch.float32)
            trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=data, callbacks=[timer],
                                 args=SFTConfig(**args, max_length=budget, completion_only_loss=True, packing=False))
        elif stage == "rm":
            from trl import RewardConfig, RewardTrainer

            model = AutoModelForSequenceClassification.from_pretrained(work.model, num_labels=1, dtype=torch.float32)
            model.config.pad_token_id = tokenizer.pad_token_id
            trainer = RewardTrainer(model=model, processing_class=tokenizer, train_dataset=data, callbacks=[timer],
                                    args=RewardConfig(**args, max_length=budget))
        elif stage == "dpo":
            from trl import DPOConfig, DPOTrainer

            model = AutoModelForCausalLM.from_pretrained(work.model, dtype=torch.float32)
            trainer = DPOTrainer(model=model, processing_class=tokenizer, train_dataset=data, callbacks=[timer],
                                 args=DPOConfig(**args, max_length=budget, beta=work.beta,
                                                precompute_ref_log_probs=False))
        else:
            from trl import GRPOConfig, GRPOTrainer

            from rlhf_exp.rewards import length_reward

            def length(prompts, completions, completion_ids, **_):
                return length_reward(prompts, completions, completion_ids, target_tokens=work.target_tokens)

            model = AutoModelForCausalLM.from_pretrained(work.model, dtype=torch.float32)
            args["per_device_train_batch_size"] = work.batch["grpo"] * work.samples_per_prompt  # completions
            trainer = GRPOTrainer(model=model, processing_class=tokenizer, train_dataset=data, reward_funcs=[length],
                                  callbacks=[timer], args=GRPOConfig(
                                      **args, num_generations=work.samples_per_prompt,
                                      max_completion_length=work.max_new_tokens, temperature=work.temperature,
                                      top_p=1.0, top_k=0, beta=work.kl_coef, epsilon=work.clip_ratio,
                                      loss_type="grpo", scale_rewards="group", num_iterations=1,
                                      disable_dropout=True, shuffle_dataset=False))
        trainer.train()
    completions = work.batch["grpo"] * work.samples_per_prompt
    return {"step_s": timer.times, "generated_tokens": [n * completions for n in timer.generated] if stage == "grpo" else []}
