"""`make bench`: this project's SFT, RM, DPO and GRPO steps against TRL's trainers on identical work.

    python -m rlhf_exp.bench [--quick] [--stages sft,rm,dpo,grpo] [--steps 5] [--warmup 1] [--threads N] [--out DIR]
    python -m rlhf_exp.bench --profile grpo     # our step's top operators: DIR/profile_grpo.md (bench/step_profile.py)

Each measurement runs in a process of its own, back to back (never two at once: they would share the
cores), so its peak resident memory is its own. Writes DIR/latest.json, DIR/<date>.json (earlier runs
stay to compare against), DIR/latest.md (the table) and DIR/logs/. --quick: the tiny model, 2 timed
steps, each side's stages one after another in one process, into bench/results/quick (what the tests
run, so the benchmark does not rot).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from rlhf_exp.bench.flops import Shape, StepWork, step_flops
from rlhf_exp.bench.ours import in_our_order
from rlhf_exp.bench.workload import STAGES, Workload, model_folder, tokenized_length, write_data

TARGET_SPEEDUP = {"sft": 1.5, "rm": 1.5, "dpo": 3.0, "grpo": 3.0}
TARGET_PEAK_FRACTION = 0.35
NOT_IDENTICAL = [
    "learning-rate schedule: TRL constant, ours cosine from the same lr (no warm-up either side): no effect on the work",
    "GRPO: sampled lengths differ run to run and side to side; generated tokens per second are reported beside",
    "micro batches: ours hardware=cpu's (SFT 4 sequences, RM 4 pairs, DPO 2 pairs, GRPO the whole rollout of 8) "
    "accumulated to the same batch and update; TRL's default, the whole batch in one pass",
    "RM: TRL trains AutoModelForSequenceClassification (its score at the last non-pad token), ours the same "
    "backbone with a scalar head read at the EOS",
]


def cpu_description() -> dict:
    import torch

    flags, name = [], platform.processor()
    try:
        info = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        all_flags = next(line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags"))
        flags = sorted(f for f in all_flags if f.startswith(("avx", "amx", "fma", "f16c")))
    except (OSError, StopIteration):
        pass
    return {"cpu": name, "flags": flags, "cores": os.cpu_count(), "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx": torch.cpu._is_amx_tile_supported()}


def measure(side: str, what: str, workload: Path, logs: Path) -> dict:
    """Run one worker; its result, or the error and its log's tail. A side's result is {stage: figures}, each
    stage with its peak resident memory (GiB): the worker's own when it ran one stage alone."""
    name = what.replace(",", "+")
    result, log = workload.parent / f"{side}_{name}.json", logs / f"{name}_{side}.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "rlhf_exp.bench.worker", side, what, str(workload),
                                    str(result)], stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    peak_gib = usage.ru_maxrss * 1024 / 2**30  # KiB on Linux
    if os.waitstatus_to_exitcode(status) != 0 or not result.is_file():
        tail = log.read_text()[-2000:]
        return {"error": f"{side} {what} failed (exit {os.waitstatus_to_exitcode(status)}); {log}:\n{tail}"}
    figures = json.loads(result.read_text())
    if side != "peak":
        for stage_figures in figures.values():
            stage_figures.setdefault("peak_gib", peak_gib)
    return figures


def mean_tokens(file: str, tokenizer, stage: str) -> StepWork:
    rows = [json.loads(line) for line in Path(file).read_text().splitlines()]
    prompt = statistics.mean(tokenized_length(tokenizer, r["prompt"]) for r in rows)
    if stage == "sft":
        response = statistics.mean(tokenized_length(tokenizer, r["completion"]) + 1 for r in rows)
    elif stage in ("rm", "dpo"):
        response = statistics.mean((tokenized_length(tokenizer, r["chosen"]) + tokenized_length(tokenizer, r["rejected"])) / 2 + 1
                                   for r in rows)
    else:
        response = 0.0
    return StepWork(prompt, response)


def summarize(stage: str, side: dict, work: Workload, shape: Shape, tokens: StepWork) -> dict:
    """Median / min / max seconds per timed step, tokens per second, the fraction of the matmul peak
    measured in the side's own process around its steps."""
    timed = side["step_s"][work.warmup_steps:]
    median = statistics.median(timed)
    batch = work.batch[stage]
    generated = statistics.mean(side["generated_tokens"][work.warmup_steps:]) if stage == "grpo" else 0.0
    flops = step_flops(stage, shape, tokens, batch, work.samples_per_prompt, generated)
    sequences = {"sft": batch, "rm": 2 * batch, "dpo": 2 * batch}.get(stage, batch * work.samples_per_prompt)
    per_sequence = tokens.prompt + (tokens.response if stage != "grpo" else generated / sequences)
    out = {"s": median, "min_s": min(timed), "max_s": max(timed), "steps_s": side["step_s"],
           "tokens_per_s": sequences * per_sequence / median,
           "peak_fraction": flops / median / side["matmul_peak_flops"],
           "matmul_peak_gflops": side["matmul_peak_flops"] / 1e9,
           "peak_gib": side["peak_gib"], "flops_per_step": flops}
    if stage == "grpo":
        out["generated_tokens_per_s"] = generated / median
        out["generated_per_step"] = generated
    return out


def compare(stage: str, ours: dict, trl: dict) -> dict:
    """The fields of bench/results/*.json for one stage."""
    row = {f"ours_{k}": v for k, v in ours.items()} | {f"trl_{k}": v for k, v in trl.items()}
    row["speedup"] = trl["s"] / ours["s"]
    row["peak_fraction"] = ours["peak_fraction"]
    row["target_speedup"] = TARGET_SPEEDUP[stage]
    return row


def peak_range(stages: dict) -> str:
    """How far the matmul peak, measured again around each side's steps (each fraction's own), drifted."""
    peaks = [row[f"{side}_matmul_peak_gflops"] for row in stages.values() if "error" not in row
             for side in ("ours", "trl")]
    return f", {min(peaks):.1f}-{max(peaks):.1f} around the sides' steps (each % below is of its own)" if peaks else ""


def table(results: dict, previous: dict | None) -> str:
    lines = [f"Benchmark {results['date']}: {results['machine']['cpu']}, {results['machine']['threads']} threads, "
             f"{results['machine']['precision']} ({results['machine']['precision_reason']}); matmul peak "
             f"{results['machine']['matmul_peak_gflops']:.1f} GFLOP/s at the start"
             f"{peak_range(results['stages'])}; flags: {' '.join(results['machine']['flags'])}",
             "", f"Model: {results['workload']['model_name']}; {results['workload']['warmup_steps']} warm-up step(s), "
             f"median of {results['workload']['steps']} timed steps (min-max); both sides without gradient "
             "checkpointing (TRL's configs turn it on by default: activations recomputed, more work, less memory).",
             "",
             "| stage | ours s/step | TRL s/step | speedup (target) | trained tok/s ours / TRL | generated tok/s ours / TRL "
             "| % matmul peak ours / TRL (target 35%) | peak RSS GiB ours / TRL |",
             "|---|---|---|---|---|---|---|---|"]
    for stage, row in results["stages"].items():
        if "error" in row:
            lines.append(f"| {stage} | {row['error'].splitlines()[0]} | | | | | | |")
            continue
        generated = (f"{row['ours_generated_tokens_per_s']:.1f} / {row['trl_generated_tokens_per_s']:.1f}"
                     if stage == "grpo" else "")
        met = "met" if row["speedup"] >= row["target_speedup"] else "missed"
        lines.append(
            f"| {stage} | {row['ours_s']:.2f} ({row['ours_min_s']:.2f}-{row['ours_max_s']:.2f}) "
            f"| {row['trl_s']:.2f} ({row['trl_min_s']:.2f}-{row['trl_max_s']:.2f}) "
            f"| **{row['speedup']:.2f}x** ({row['target_speedup']}x: {met}) "
            f"| {row['ours_tokens_per_s']:.0f} / {row['trl_tokens_per_s']:.0f} | {generated} "
            f"| {100 * row['ours_peak_fraction']:.0f}% / {100 * row['trl_peak_fraction']:.0f}% "
            f"| {row['ours_peak_gib']:.2f} / {row['trl_peak_gib']:.2f} |")
    if previous:
        before = [f"{s} {p['speedup']:.2f}x -> {results['stages'][s]['speedup']:.2f}x"
                  for s, p in previous.get("stages", {}).items()
                  if "speedup" in p and "speedup" in results["stages"].get(s, {})]
        if before:
            lines += ["", f"Against the previous run ({previous['date']}): " + "; ".join(before) + "."]
    lines += ["", "Not identical between the sides:", *[f"- {note}" for note in NOT_IDENTICAL]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_exp.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 timed steps (tests)")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5; --quick 2)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default: all cores)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results, --quick bench/results/quick)")
    parser.add_argument("--profile", choices=STAGES, default=None, help="profile one of our steps instead")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from rlhf_exp.config import compose_config
    from rlhf_exp.runtime import choose_precision

    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown {unknown} (known: {', '.join(STAGES)})")
    out = Path(args.out or ("bench/results/quick" if args.quick else "bench/results"))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    cache_dir = str(compose_config([]).paths.cache_dir)
    precision, reason = choose_precision("auto", "cpu")
    threads = args.threads or torch.get_num_threads()
    folder = model_folder(args.quick, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = (out / "profile").resolve() if args.profile else Path(tmp)  # a profile's work stays, to profile other code on
        count = 16 if args.quick else 64
        work = Workload(model=str(folder), files={}, precision=precision, threads=threads, warmup_steps=args.warmup,
                        steps=args.steps or (2 if args.quick else 5))
        if args.quick:  # what keeps the code paths alive, at the least cost
            work.max_prompt_tokens, work.max_response_tokens, work.max_new_tokens = 192, 32, 8
            work.batch = {"sft": 4, "rm": 2, "dpo": 2, "grpo": 1}
            work.peak_matmul_size = 1024  # an eighth of the work, still far past the caches
        work.files = write_data(tmp / "data", tokenizer, work.max_prompt_tokens, work.max_response_tokens, count, cache_dir)
        work.trl_files = {stage: in_our_order(stage, work, tokenizer, tmp / "data") for stage in stages}
        workload = work.save(tmp / "workload.json")
        if args.profile:
            report = out / f"profile_{args.profile}.md"
            return subprocess.run([sys.executable, "-m", "rlhf_exp.bench.step_profile", args.profile, str(workload),
                                   str(report)]).returncode
        print(f"bench: {folder.name}, {precision} ({reason}), {threads} threads; measuring the matmul peak", flush=True)
        peak = measure("peak", precision, workload, out / "logs")
        if "error" in peak:
            print(peak["error"], file=sys.stderr)
            return 1
        shape = Shape.of(folder)
        rows = {}
        # --quick: one process a side for all its stages (start-up and imports paid once); else one a measurement
        batches = [stages] if args.quick else [[stage] for stage in stages]
        measured: dict[str, dict[str, dict]] = {}
        for batch in batches:
            for side in ("ours", "trl"):
                start = time.perf_counter()
                print(f"bench: {','.join(batch)} {side} ...", end=" ", flush=True)
                figures = measure(side, ",".join(batch), workload, out / "logs")
                print("failed" if "error" in figures else f"{time.perf_counter() - start:.0f} s", flush=True)
                for stage in batch:
                    measured.setdefault(stage, {})[side] = figures if "error" in figures else figures[stage]
        for stage in stages:
            tokens = mean_tokens(work.files[stage], tokenizer, stage)
            sides = measured[stage]
            failed = [s["error"] for s in sides.values() if "error" in s]
            rows[stage] = {"error": "; ".join(failed)} if failed else compare(
                stage, summarize(stage, sides["ours"], work, shape, tokens),
                summarize(stage, sides["trl"], work, shape, tokens))
    import transformers
    import trl

    machine = {**cpu_description(), "threads": threads, "precision": precision, "precision_reason": reason,
               "matmul_peak_gflops": peak["flops"] / 1e9, "torch": torch.__version__,
               "transformers": transformers.__version__, "trl": trl.__version__, "python": platform.python_version()}
    workload_fields = {k: v for k, v in asdict(work).items() if k not in ("files", "model")}
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": "python -m rlhf_exp.bench " + " ".join(argv or sys.argv[1:]),
               "machine": machine, "workload": {"model_name": folder.name, **workload_fields},
               "stages": rows, "not_identical": NOT_IDENTICAL}
    latest = out / "latest.json"
    previous = json.loads(latest.read_text()) if latest.is_file() else None
    text = table(results, previous)
    latest.write_text(json.dumps(results, indent=1))
    (out / f"{time.strftime('%Y-%m-%d_%H%M')}.json").write_text(json.dumps(results, indent=1))
    (out / "latest.md").write_text(text)
    print(text)
    return 1 if any("error" in row for row in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
