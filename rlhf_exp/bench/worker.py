"""One measurement in a process of its own, so its peak memory is its own:

    python -m rlhf_exp.bench.worker <ours | trl | peak> <stage | precision> <workload.json> <result.json>

A side's worker also measures the matmul peak in its own process just before and just after its steps:
a shared machine's speed drifts over a benchmark run (this 2-core box's has read from 92 to 184 GFLOP/s on
the same day), and a side's fraction of the peak is only meaningful against the peak of its own minutes.
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

    work = Workload.load(workload)
    torch.set_num_threads(work.threads)
    if side == "peak":
        out = {"flops": matmul_peak(what, work.peak_matmul_size)}
    else:
        if side == "ours":
            from rlhf_exp.bench.ours import run
        else:
            from rlhf_exp.bench.trl_side import run
        before = matmul_peak(work.precision, work.peak_matmul_size)
        out = run(what, work)
        # the faster of the two: the fraction is then, if anything, an underestimate
        out["matmul_peak_flops"] = max(before, matmul_peak(work.precision, work.peak_matmul_size))
    Path(result).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
