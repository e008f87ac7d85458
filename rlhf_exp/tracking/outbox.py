"""Tracker calls that never block or stop training: written to the run folder first, sent in the background.

Each call (metrics, tags, an artifact, the final status) is appended as one JSON line to
`<run>/tracking_outbox/outbox.jsonl`, then sent by one of two background threads: metrics, tags and
the final status in order, and what goes to the artifact store (files, texts, tables) on its own, so a
failing artifact store never holds back a metric or the run's status. A failed send is retried with a
short backoff while training goes on (a failing artifact is put back and the next one tried);
`<run>/tracking_outbox/sent.txt` lists the lines that reached the tracker. When the run ends, the outbox
is given `tracking.flush_timeout_s` to empty; what is left stays on disk and
`python -m rlhf_exp.sync <run folder>` sends it later. A run resumed in the same folder (a pipeline's
stage) first sends what the process before it left unsent.
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
SENT = "sent.txt"       # the index (line number from 0) of every record the tracker has, one per line
SENT_COUNT = "sent"     # written by earlier versions: the first N records were sent
ARTIFACT_KINDS = ("artifact", "text", "table", "model")  # bound for the artifact store: a lane of their own
_STOP = object()
BACKOFF_S = (0.5, 1, 2, 4, 5)  # then every 5 s: a restarted server is picked up within seconds


class Outbox:
    def __init__(self, folder: Path, send: Callable[[dict[str, Any]], None]):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "files").mkdir(exist_ok=True)
        self.lines = self.folder / LINES
        self.send = send
        self.sent = read_sent(self.folder)
        self.failures = 0
        self.failed_artifacts: dict[int, str] = {}  # index -> the last error, while it is not sent
        self._lock = threading.Lock()
        self._records: queue.Queue = queue.Queue()
        self._artifacts: queue.Queue = queue.Queue()
        self._give_up = threading.Event()
        if self.lines.is_file() and not self.lines.read_bytes().endswith(b"\n") and self.lines.stat().st_size:
            with self.lines.open("a") as out:  # a line cut off by a killed process stays a line of its own
                out.write("\n")
        self.written = count_lines(self.lines)
        for index, record in pending(self.folder):  # left by a process that died before it sent them
            self._route(index, record)
        self._threads = [threading.Thread(target=self._send_in_order, name="tracking-outbox", daemon=True),
                         threading.Thread(target=self._send_artifacts, name="tracking-artifacts", daemon=True)]
        for thread in self._threads:
            thread.start()

    def put(self, record: dict[str, Any]) -> None:
        with self.lines.open("a") as out:
            out.write(json.dumps(record) + "\n")
        index, self.written = self.written, self.written + 1
        self._route(index, record)

    def _route(self, index: int, record: dict[str, Any]) -> None:
        (self._artifacts if record.get("kind") in ARTIFACT_KINDS else self._records).put((index, record))

    def file_for(self, name: str) -> Path:
        """A path inside the outbox for content that must outlive the call (a figure, a text)."""
        path = self.folder / "files" / f"{self.written:06d}" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def unsent(self) -> int:
        with self._lock:
            return self.written - len(self.sent)

    def close(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for every record to be sent; returns how many were not."""
        deadline = time.monotonic() + timeout_s
        self._records.put(_STOP)
        self._artifacts.put(_STOP)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self._threads):
            self._give_up.set()
            for thread in self._threads:
                thread.join(10)
        return self.unsent()

    def _mark_sent(self, index: int) -> None:
        with self._lock:
            self.sent.add(index)
            self.failed_artifacts.pop(index, None)
            mark_sent(self.folder, index)

    def _try(self, index: int, record: dict[str, Any], attempt: int) -> bool:
        try:
            self.send(record)
        except Exception as error:  # noqa: BLE001 - any failure: keep it and try again later
            self.failures += 1
            reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
            if record.get("kind") in ARTIFACT_KINDS:
                self.failed_artifacts[index] = reason
            if attempt == 0:
                log.warning("tracking: could not send %s (%s); training goes on, it is kept in %s and retried",
                            record.get("kind"), reason, self.folder)
            return False
        self._mark_sent(index)
        return True

    def _send_in_order(self) -> None:
        """Metrics, tags and the final status: each waits for the one before it."""
        while True:
            item = self._records.get()
            if item is _STOP:
                return
            attempt = 0
            while not self._try(*item, attempt):
                if self._give_up.wait(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]):
                    return
                attempt += 1
            if attempt:
                log.warning("tracking: sending again after %d failed tries", attempt)

    def _send_artifacts(self) -> None:
        """Files, texts and tables: one that fails is put back with a backoff and the next one is tried."""
        waiting: list[list] = []  # [due (monotonic s), attempts, index, record]
        stopping = False
        while waiting or not stopping:
            due = min((entry[0] for entry in waiting), default=None)
            pause = None if due is None else max(0.0, due - time.monotonic())
            item = None
            if stopping:
                if self._give_up.wait(pause):
                    return
            else:
                try:
                    item = self._artifacts.get(timeout=pause)
                except queue.Empty:
                    pass
            if item is _STOP:
                stopping = True
            elif item is not None:
                if not self._try(*item, 0):
                    waiting.append([time.monotonic() + BACKOFF_S[0], 1, *item])
            for entry in [e for e in waiting if e[0] <= time.monotonic()]:
                if self._try(entry[2], entry[3], entry[1]):
                    waiting.remove(entry)
                else:
                    entry[0] = time.monotonic() + BACKOFF_S[min(entry[1], len(BACKOFF_S) - 1)]
                    entry[1] += 1
            if self._give_up.is_set():
                return


def count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open() as lines:
        return sum(1 for _ in lines)


def read_sent(folder: Path) -> set[int]:
    """The indices of the records the tracker has."""
    folder = Path(folder)
    sent: set[int] = set()
    if (folder / SENT_COUNT).is_file():
        sent.update(range(int((folder / SENT_COUNT).read_text() or 0)))
    if (folder / SENT).is_file():
        sent.update(int(line) for line in (folder / SENT).read_text().split() if line.isdigit())
    return sent


def mark_sent(folder: Path, index: int) -> None:
    with (Path(folder) / SENT).open("a") as out:
        out.write(f"{index}\n")


def pending(folder: Path) -> list[tuple[int, dict[str, Any]]]:
    """(index, record) of every record of an outbox not sent yet, in order."""
    sent = read_sent(folder)
    return [(index, record) for index, record in numbered_records(folder) if index not in sent]


def records(folder: Path) -> list[dict[str, Any]]:
    """Every record of an outbox, sent or not, in order."""
    return [record for _, record in numbered_records(folder)]


def numbered_records(folder: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number from 0, record) of every whole line of an outbox."""
    lines = Path(folder) / LINES
    if not lines.is_file():
        return []
    found = []
    for index, line in enumerate(lines.read_text().splitlines()):
        try:
            found.append((index, json.loads(line)))
        except json.JSONDecodeError:  # cut off mid-write by a process that was killed
            continue
    return found


def now_ms() -> int:
    return int(time.time() * 1000)
