"""One measurement in a process of its own, so its peak memory is its own:

    python -m rlhf_exp.bench.worker <ours | trl | peak> <stage | precision> <workload.json> <result.json>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    side, what, workload, result = argv
    import torch

    from rlhf_exp.bench.workload import Workload

    work = Workload.load(workload)
    torch.set_num_threads(work.threads)
    if side == "peak":
        from rlhf_exp.bench.flops import matmul_peak

        out = {"flops": matmul_peak(what)}
    elif side == "ours":
        from rlhf_exp.bench import ours

        out = ours.run(what, work)
    else:
        from rlhf_exp.bench import trl_side

        out = trl_side.run(what, work)
    Path(result).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
