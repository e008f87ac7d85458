"""The benchmark against TRL (rlhf_exp/bench): its --quick mode end to end, and the work it counts."""

from __future__ import annotations

import json

import pytest

from rlhf_exp.bench.flops import Shape, StepWork, step_flops


def test_the_work_counted_per_step_is_the_least_each_stage_needs():
    """By hand, for a model with 10 body weights, a 5-weight LM head, hidden 2 and one layer; prompts of 3
    tokens, responses of 2. A forward over T tokens of sequences of S: 2·10·T + 2·5·(head tokens) + 2·1·2·S·T.
    A prompt counts once however many responses follow it."""
    shape, work = Shape(hidden=2, layers=1, body_params=10, head_params=5), StepWork(prompt=3, response=2)
    forward_one = 2 * 10 * 5 + 2 * 5 * 2 + 2 * 1 * 2 * 5 * 5  # 5 tokens, the head on the 2 response tokens
    assert step_flops("sft", shape, work, batch=1) == 3 * forward_one                  # forward + backward
    pair = 3 + 2 + 2  # prompt, chosen, rejected
    assert step_flops("rm", shape, work, batch=1) == 3 * (2 * 10 * pair + 2 * 1 * 2 * 5 * pair)  # no LM head
    dpo_forward = 2 * 10 * pair + 2 * 5 * 4 + 2 * 1 * 2 * 5 * pair
    assert step_flops("dpo", shape, work, batch=1) == 4 * dpo_forward                  # + the reference's forward
    # GRPO: 1 prompt x 2 samples, 4 tokens sampled in all (2 each): sampling, then reference + policy
    sampling = 2 * 10 * (3 + 4) + 2 * 5 * 4 + 2 * 1 * 2 * 5 * (3 + 4)
    assert step_flops("grpo", shape, work, batch=1, group=2, generated=4) == sampling + 4 * sampling


def test_the_shape_counts_smollm2_135m_as_its_parameters(tmp_path):
    """SmolLM2-135M has 134,515,008 parameters: the counted matmul weights plus its 61 RMSNorm vectors."""
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "intermediate_size": 1536, "vocab_size": 49152}))
    shape = Shape.of(tmp_path)
    assert shape.body_params + shape.head_params + 61 * 576 == 134_515_008


def test_the_quick_benchmark_times_both_sides_and_writes_its_results(tmp_path):
    from rlhf_exp.bench.__main__ import main

    assert main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "latest.json").read_text())
    assert results["machine"]["matmul_peak_gflops"] > 0 and results["machine"]["threads"] >= 1
    for stage in ("sft", "rm", "dpo", "grpo"):
        row = results["stages"][stage]
        assert len(row["ours_steps_s"]) == len(row["trl_steps_s"]) == 3, stage  # 1 warm-up + 2 timed steps each
        assert row["speedup"] == pytest.approx(row["trl_s"] / row["ours_s"])
        assert row["ours_peak_gib"] > 0.2 and row["trl_peak_gib"] > 0.2  # a process's own peak, torch loaded
        assert 0 < row["peak_fraction"] < 2
        for side in ("ours", "trl"):  # each side's fraction is of the peak measured in its own process
            assert row[f"{side}_peak_fraction"] == pytest.approx(
                row[f"{side}_flops_per_step"] / row[f"{side}_s"] / (row[f"{side}_matmul_peak_gflops"] * 1e9))
    grpo = results["stages"]["grpo"]
    assert grpo["ours_generated_per_step"] > 0 and grpo["trl_generated_per_step"] > 0
    table = (tmp_path / "latest.md").read_text()
    assert all(f"| {stage} |" in table for stage in ("sft", "rm", "dpo", "grpo")) and "Not identical" in table
    assert len(list(tmp_path.glob("20*.json"))) == 1  # the dated copy kept beside latest.json


def test_trl_reads_the_rows_our_trainer_visits_in_the_order_it_visits_them(tmp_path, tokenizer):
    """Step k is the same examples on both sides: catches an order taken before our held-out split, an
    off-by-one file line, or a stream seeded apart from the trainer's."""
    from rlhf_exp.bench.ours import overrides
    from rlhf_exp.bench.ours import in_our_order
    from rlhf_exp.bench.workload import Workload, model_folder
    from rlhf_exp.config import compose_config, resolved
    from rlhf_exp.stages.dpo import DPOTrainer
    from rlhf_exp.tracking.base import Tracker

    rows = [{"prompt": f"Question {i}:", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(20)]
    file = tmp_path / "dpo.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache_dir = str(compose_config([]).paths.cache_dir)
    work = Workload(model=str(model_folder(True, cache_dir)), files={"dpo": str(file)}, precision="fp32", threads=1,
                    warmup_steps=1, steps=2)
    work.batch["dpo"] = 3
    ordered = [json.loads(line) for line in open(in_our_order("dpo", work, tokenizer, tmp_path))]
    assert len(ordered) == 9 and all(row in rows for row in ordered)

    cfg = resolved(compose_config(overrides("dpo", work, tmp_path)))
    trainer = DPOTrainer(cfg=cfg, tracker=Tracker(), run_dir=tmp_path / "run")
    trainer.setup()
    visited = [trainer.train_set[i] for i in trainer.batches.take(9)]
    assert [tokenizer.decode(p.prompt_ids) for p in visited] == [row["prompt"] for row in ordered]
    assert [tokenizer.decode(p.chosen_ids[:-1]) for p in visited] == [row["chosen"] for row in ordered]


def test_our_micro_batches_are_hardware_cpus_where_they_divide_the_batch():
    """The benchmark's quick mode takes 2 RM pairs a step, fewer than hardware=cpu's 4: the micro batch
    must divide the batch, or the stage refuses the config (as it did)."""
    from rlhf_exp.bench.ours import micro_batch

    assert micro_batch("sft", 8) == 4 and micro_batch("rm", 4) == 4 and micro_batch("dpo", 4) == 2
    assert micro_batch("rm", 2) == 2 and micro_batch("dpo", 3) == 1 and micro_batch("sft", 6) == 3
