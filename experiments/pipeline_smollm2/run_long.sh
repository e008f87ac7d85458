#!/usr/bin/env bash
# The longer run of experiment=tldr_pipeline written up in experiments/pipeline_smollm2/ (one thread, pinned)
cd "$(dirname "$0")/../.."  # the repository root
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
exec taskset -c 0 .venv/bin/python -m rlhf_exp experiment=tldr_pipeline hardware.num_threads=1 \
  "pipeline.common=['data=tldr','data.phase_split.rm=3','data.phase_split.rl=3','data.phase_split.judge=2','stage.save_every=10','stage.keep_checkpoints=1','stage.keep_best=true','data.max_prompt_tokens=256','data.max_response_tokens=48']" \
  "pipeline.extra.sft=['stage.max_steps=40','stage.eval_examples=32']" \
  "pipeline.extra.rm=['stage.max_steps=36','stage.eval_examples=128','stage.norm_examples=64','model.num_layers=8','stage.eval_every=12']" \
  "pipeline.extra.judge=['stage.max_steps=36','stage.eval_examples=128','stage.norm_examples=64','model.num_layers=8','stage.eval_every=12']" \
  "pipeline.extra.dpo=['stage.max_steps=24','stage.eval_examples=64','stage.eval_every=12']" \
  "pipeline.extra.grpo=['stage.max_steps=16','stage.eval_examples=16','stage.eval_every=8','stage.generation.max_new_tokens=48']" \
  "pipeline.extra.eval=['stage.eval_examples=48','stage.generation.max_new_tokens=48']"
