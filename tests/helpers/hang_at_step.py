"""`python -m rlhf_exp <overrides>` (or under torchrun, each rank) that stops dead once step
$HANG_AT_STEP's training metrics are logged, after writing its pid to $HANG_MARKER_DIR/rank<k>: the
moment a test SIGKILLs it, as a preemption or an OOM kill would land, past the run's last checkpoint
(the steps after it trained and logged, then lost) with its MLflow run RUNNING. The pid is there
because torchrun starts each rank in a session of its own, out of reach of a kill of the launcher's
process group. Nothing else changes: the patched method calls the real one first."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: `helpers.varied_reward` by _target_

from rlhf_exp import __main__ as entrypoint  # noqa: E402
from rlhf_exp import distributed  # noqa: E402
from rlhf_exp.stages.base import Trainer  # noqa: E402

HANG_AT_STEP = int(os.environ["HANG_AT_STEP"])
HANG_IN_STAGE = os.environ.get("HANG_IN_STAGE")  # only in this stage (a pipeline runs several)
log_metrics = Trainer.log


def log_then_hang(self: Trainer, metrics: dict[str, float]) -> None:
    log_metrics(self, metrics)
    if (self.step == HANG_AT_STEP and any(name.startswith("train/") for name in metrics)
            and HANG_IN_STAGE in (None, self.stage.name)):
        marker = Path(os.environ["HANG_MARKER_DIR"], f"rank{distributed.rank()}")
        marker.with_name(f".{marker.name}").write_text(str(os.getpid()))
        os.replace(marker.with_name(f".{marker.name}"), marker)  # the test reads our pid: whole or absent
        while True:
            time.sleep(3600)


Trainer.log = log_then_hang

if __name__ == "__main__":
    entrypoint.cli()
