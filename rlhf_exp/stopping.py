"""Stopping cleanly on SIGTERM and SIGINT: what `docker stop`, SLURM preemption, Kubernetes and Ctrl-C send.

The handler only records the signal; the training loop sees it at the next step boundary (an evaluation
or generation pass, at its next batch), writes a checkpoint there and raises `RunStopped`, and the run is closed KILLED with the checkpoint named and
the command that resumes it printed. A second Ctrl-C stops at once (KeyboardInterrupt), as users expect.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[int] = []


class RunStopped(Exception):
    """Raised at a step boundary after a stop signal, once the checkpoint is written."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (no step was taken)"
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}: {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what the shell reports for a process ended by this signal


class PassInterrupted(Exception):
    """A stop signal seen between the batches of an evaluation or generation pass: the pass is abandoned and
    the run stops at the step it has reached (its trainer checkpoints there, the evaluation left to redo)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} during an evaluation pass")


def check_between_batches() -> None:
    """Raise PassInterrupted if a stop signal came (in one process: ranks that saw the signal at different
    batches would leave each other waiting in a collective, so a torchrun pass runs to its end)."""
    from rlhf_exp import distributed

    if _received and distributed.world_size() == 1:
        raise PassInterrupted(_received[0])


def until_stopped(batches: Iterable[T]) -> Iterator[T]:
    """`batches`, stopping between two of them once a stop signal came (check_between_batches)."""
    for batch in batches:
        check_between_batches()
        yield batch


def received() -> int | None:
    """The stop signal received in this run, if any."""
    return _received[0] if _received else None


def _handle(signum, frame) -> None:
    if _received and signum == signal.SIGINT:
        raise KeyboardInterrupt  # Ctrl-C twice: stop now, without the checkpoint
    if not _received:
        _received.append(signum)
        log.warning("%s received: stopping after the current step (a checkpoint, then exit)%s",
                    signal.Signals(signum).name, "; Ctrl-C again to stop at once" if signum == signal.SIGINT else "")


@contextmanager
def stop_at_step_boundary() -> Iterator[None]:
    """Handle SIGTERM / SIGINT within the block (main thread only: elsewhere Python's handlers stay)."""
    _received.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _handle) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _received.clear()
