"""A local `mlflow server` on 127.0.0.1, for work where several processes write one tracking store.

SQLite takes one writer at a time; a server in front of it serializes the writes of parallel jobs (a joblib
sweep, `make soak`). `MlflowServer` starts one over a backend store and stops it (its whole process group).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` over `backend_store_uri`; run artifacts go to `artifact_root` (a folder or URI the
    server hands to clients) or, with `serve_artifacts`, through the server into that folder."""

    def __init__(self, backend_store_uri: str, artifact_root: str, *, serve_artifacts: bool = False,
                 log_path: Path | None = None, start_timeout_s: float = 180.0, port: int | None = None):
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        where = (["--artifacts-destination", artifact_root] if serve_artifacts
                 else ["--default-artifact-root", artifact_root, "--no-serve-artifacts"])
        log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", backend_store_uri, *where],
            stdout=log, stderr=log, start_new_session=True,
            # MLflow 3 also starts a job runner and huey consumers for its GenAI jobs (judges, trace
            # rollups): processes a tracking server for training runs never uses, and CPU a small box lacks
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        if log is not subprocess.DEVNULL:
            log.close()
        self._wait_ready(start_timeout_s, log_path)

    def _wait_ready(self, timeout_s: float, log_path: Path | None) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with code {self.process.returncode}"
                                   + (f" (see {log_path})" if log_path else ""))
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer at {self.uri} in {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.process.pid, signal.SIGKILL)
