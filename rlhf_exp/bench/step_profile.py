"""Where one of our steps spends its time, on the benchmark's work: torch.profiler's top operators.

    python -m rlhf_exp.bench --profile grpo          # writes the work, then runs this in a process of its own
    python -m rlhf_exp.bench.step_profile <stage> <workload.json> <out.md>

Builds the stage's trainer as the benchmark does (`bench.ours.overrides`), runs the warm-up steps, then
profiles one step: its phase times (the stage's `time/*` metrics) and the 20 operators with the most
self CPU time, beside the matmul rate measured just before it (a shared machine's speed drifts: compare
two profiles at the rates they state). It uses only what older checkouts have too, so a profile before a
change is this file run against the older code: `PYTHONPATH=<older checkout> python rlhf_exp/bench/step_profile.py grpo ...`.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    stage, workload, out = argv
    import torch
    from torch.profiler import ProfilerActivity, profile

    import rlhf_exp
    from rlhf_exp.bench import ours
    from rlhf_exp.bench.flops import matmul_peak
    from rlhf_exp.bench.workload import Workload
    from rlhf_exp.config import compose_config, resolved, validate
    from rlhf_exp.stages import stage_spec
    from rlhf_exp.tracking.base import Tracker

    from dataclasses import fields

    saved = json.loads(Path(workload).read_text())  # an older checkout's Workload may lack newer fields
    work = Workload(**{f.name: saved[f.name] for f in fields(Workload) if f.name in saved})
    torch.set_num_threads(work.threads)
    with tempfile.TemporaryDirectory() as root:
        cfg = resolved(compose_config(ours.overrides(stage, work, Path(root))))
        validate(cfg)
        trainer = stage_spec(stage).trainer(cfg=cfg, tracker=Tracker(), run_dir=Path(root) / "run")
        trainer.setup()
        for _ in range(work.warmup_steps):
            trainer.train_step()
        rate = matmul_peak(work.precision)
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            metrics = trainer.train_step()
        seconds = time.perf_counter() - start
    operators = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=40)
    phases = ", ".join(f"{k[5:-2]} {v:.2f} s" for k, v in metrics.items() if k.startswith("time/") and k != "time/step_s")
    text = (f"# Profile of one {stage} step ({Path(rlhf_exp.__file__).parent.parent})\n\n"
            f"{work.threads} threads, {work.precision}, matmul peak {rate / 1e9:.0f} GFLOP/s just before; "
            f"the step took {seconds:.2f} s under the profiler"
            f"{f' ({phases})' if phases else ''}.\n\n```\n{operators}```\n")
    Path(out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
