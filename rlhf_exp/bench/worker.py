"""Measurements in a process of their own, so their peak memory is their own:

    python -m rlhf_exp.bench.worker <ours | trl | peak> <stage[,stage...] | precision> <workload.json> <result.json>

A side's worker also measures the matmul peak in its own process just before and just after each stage's
steps: a shared machine's speed drifts over a benchmark run (this 2-core box's has read from 92 to 184
GFLOP/s on the same day), and a side's fraction of the peak is only meaningful against the peak of its own
minutes. Several stages (`--quick`) run one after another in one process, paying its start-up and imports
once; each stage's peak memory is then read in the process (the kernel's high-water mark, reset before it
starts), where one stage alone has the whole process's peak.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    side, what, workload, result = argv
    import torch

    from rlhf_exp.bench.flops import matmul_peak
    from rlhf_exp.bench.workload import Workload
    from rlhf_exp.memory import peak_memory, reset_peak_memory

    work = Workload.load(workload)
    torch.set_num_threads(work.threads)
    if side == "peak":
        Path(result).write_text(json.dumps({"flops": matmul_peak(what, work.peak_matmul_size)}))
        return 0
    if side == "ours":
        from rlhf_exp.bench.ours import run
    else:
        from rlhf_exp.bench.trl_side import run
    stages, out = what.split(","), {}
    for stage in stages:
        if len(stages) > 1:
            reset_peak_memory(torch.device("cpu"))
        before = matmul_peak(work.precision, work.peak_matmul_size)
        out[stage] = run(stage, work)
        # the faster of the two: the fraction is then, if anything, an underestimate
        out[stage]["matmul_peak_flops"] = max(before, matmul_peak(work.precision, work.peak_matmul_size))
        if len(stages) > 1:
            out[stage]["peak_gib"] = peak_memory(torch.device("cpu")) / 2**30
    Path(result).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
