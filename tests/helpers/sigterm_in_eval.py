"""`python -m rlhf_exp <overrides>` that sends itself SIGTERM while the eval stage's first pass runs its
first batch: `docker stop` or a SLURM preemption landing in the middle of a pipeline's evaluation. The signal
is real and goes through the run's own handler; nothing else changes (the patched function wraps the real
one, and passes of every other stage are left alone)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: `helpers.varied_reward` by _target_

from rlhf_exp import __main__ as entrypoint  # noqa: E402
from rlhf_exp import stopping  # noqa: E402

real_until_stopped = stopping.until_stopped
sent: list[int] = []


def until_stopped(batches):
    if sys._getframe(1).f_globals.get("__name__") != "rlhf_exp.stages.eval" or sent:
        return real_until_stopped(batches)

    def first_batch_then_signal():
        for number, batch in enumerate(real_until_stopped(batches)):
            if number == 0:
                sent.append(os.getpid())
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    return first_batch_then_signal()


stopping.until_stopped = until_stopped

if __name__ == "__main__":
    entrypoint.cli()
