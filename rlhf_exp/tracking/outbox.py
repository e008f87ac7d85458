"""Tracker calls that never block or stop training: written to the run folder first, sent in the background.

Each call (metrics, tags, an artifact, the final status) is appended as one JSON line to
`<run>/tracking_outbox/outbox.jsonl`, then one background thread sends the lines in order. A send
that fails (the server is down, the database locked) is retried with a short backoff while training
goes on; `<run>/tracking_outbox/sent` counts the lines that reached the tracker. When the run ends,
the outbox is given `tracking.flush_timeout_s` to empty; what is left stays on disk and
`python -m rlhf_exp.sync <run folder>` sends it later (so does a run that was SIGKILLed).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

OUTBOX = "tracking_outbox"
LINES = "outbox.jsonl"  # one JSON record per tracker call
SENT = "sent"           # how many of them the tracker has
_STOP = object()
BACKOFF_S = (0.5, 1, 2, 4, 5)  # then every 5 s: a restarted server is picked up within seconds


class Outbox:
    def __init__(self, folder: Path, send: Callable[[dict[str, Any]], None]):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "files").mkdir(exist_ok=True)
        self.lines = self.folder / LINES
        self.send = send
        self.written = count_lines(self.lines)
        self.sent = read_sent(self.folder)
        self.failures = 0
        self._queue: queue.Queue = queue.Queue()
        self._give_up = threading.Event()
        self._thread = threading.Thread(target=self._send_in_order, name="tracking-outbox", daemon=True)
        self._thread.start()

    def put(self, record: dict[str, Any]) -> None:
        with self.lines.open("a") as out:
            out.write(json.dumps(record) + "\n")
        self.written += 1
        self._queue.put(record)

    def file_for(self, name: str) -> Path:
        """A path inside the outbox for content that must outlive the call (a figure, a text)."""
        path = self.folder / "files" / f"{self.written:06d}" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def close(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for every record to be sent; returns how many were not."""
        self._queue.put(_STOP)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._give_up.set()
            self._thread.join(10)
        return self.written - self.sent

    def _send_in_order(self) -> None:
        while True:
            record = self._queue.get()
            if record is _STOP:
                return
            for attempt in range(10**9):
                try:
                    self.send(record)
                    break
                except Exception as error:  # noqa: BLE001 - any failure: keep it and try again later
                    self.failures += 1
                    if attempt == 0:
                        log.warning("tracking: could not send (%s: %s); training goes on, records are kept in %s "
                                    "and retried", type(error).__name__, str(error).splitlines()[0][:200] if str(error)
                                    else "", self.folder)
                    if self._give_up.wait(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]):
                        return
            if attempt:
                log.warning("tracking: sending again after %d failed tries", attempt)
            self.sent += 1
            write_sent(self.folder, self.sent)


def count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open() as lines:
        return sum(1 for _ in lines)


def read_sent(folder: Path) -> int:
    sent = Path(folder) / SENT
    return int(sent.read_text() or 0) if sent.is_file() else 0


def write_sent(folder: Path, count: int) -> None:
    (Path(folder) / SENT).write_text(str(count))


def pending(folder: Path) -> list[dict[str, Any]]:
    """The records of an outbox not sent yet, in order."""
    return records(folder)[read_sent(folder):]


def records(folder: Path) -> list[dict[str, Any]]:
    """Every record of an outbox, sent or not, in order."""
    lines = Path(folder) / LINES
    if not lines.is_file():
        return []
    found = []
    for line in lines.read_text().splitlines():
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a process killed mid-write
            break
    return found


def now_ms() -> int:
    return int(time.time() * 1000)
