"""One process per run folder: an exclusive lock on `<run folder>/.run.lock` for the life of a run.

Two processes on one run (two resumes of one folder started together) would train the same steps,
overwrite each other's checkpoints, log into one MLflow run twice and share one outbox. The lock is an
advisory `flock`, which the kernel drops when its process dies however it dies, so a lock left by a
SIGKILLed run is simply taken over (and said so: the file still names the dead holder).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from rlhf_exp.errors import UserInputError

log = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"


class RunFolderBusy(UserInputError):
    """Another live process holds the run folder."""


def holder(lock_file: Path) -> dict:
    try:
        return json.loads(lock_file.read_text() or "{}")
    except (OSError, ValueError):
        return {}


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold `folder`'s run lock for the block; refused in one line naming the live holder's pid and host."""
    folder.mkdir(parents=True, exist_ok=True)
    lock_file = folder / LOCK_FILE
    handle = open(lock_file, "a+")  # never truncated before the lock is held: it names the holder
    try:
        if not _try_lock(handle, tries=20):  # a moment's hold by another start's look for dead runs is waited out
            now = holder(lock_file)
            raise RunFolderBusy(
                f"{folder} is in use by process {now.get('pid', '?')} on {now.get('host', '?')} (since "
                f"{now.get('since', '?')}): one run folder takes one process at a time; wait for it to end or stop "
                "it, then run again") from None
        left = holder(lock_file)
        if left:  # written by a holder that never released it: its process died
            log.warning("took over the run lock of %s from process %s on %s, which died without releasing it",
                        folder, left.get("pid", "?"), left.get("host", "?"))
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()  # released: an empty file names nobody
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def _try_lock(handle, tries: int = 1) -> bool:
    for attempt in range(tries):
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < tries:
                time.sleep(0.05)
    return False


def take_stale_locks(folders: Iterable[Path]) -> list[tuple[Path, dict]]:
    """The run folders among `folders` whose lock names a holder that died holding it (a SIGKILL, an OOM kill),
    with that holder; their locks are cleared. Folders of live runs are left alone."""
    stale = []
    for folder in folders:
        lock_file = Path(folder) / LOCK_FILE
        if not lock_file.is_file() or not lock_file.stat().st_size:
            continue
        with open(lock_file, "a+") as handle:
            if not _try_lock(handle):
                continue  # held: a live run
            left = holder(lock_file)
            if left:
                handle.seek(0)
                handle.truncate()
                stale.append((Path(folder), left))
            fcntl.flock(handle, fcntl.LOCK_UN)
    return stale


@contextmanager
def all_locked(folders: Iterable[Path]) -> Iterator[None]:
    """Every folder's run lock (each once, in the order given) for the block."""
    with ExitStack() as stack:
        for folder in dict.fromkeys(Path(f).resolve() for f in folders):
            stack.enter_context(locked(folder))
        yield
