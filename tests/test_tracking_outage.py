"""A tracking server that goes away (issue 11.2): training never waits on it, nothing logged is lost.

Against a real `mlflow server` on 127.0.0.1 that the test starts, kills (SIGKILL, mid-run) and restarts.
Before: the run froze ~4 minutes at the next metric in MLflow's retries, ~4 more in clean-up, then
crashed (rc 1) with the steps after the outage never trained; nothing listening at start cost 308 s
and a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, TINY, run_cli
from rlhf_exp.tracking.server import MlflowServer, free_port


STEPS = [*TINY, "stage.eval_every=null", "stage.num_samples=0", "hydra.job_logging.root.level=WARNING"]


class Server:
    """`mlflow server` on 127.0.0.1:<port> over one SQLite file (the soak's), killable and restartable."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.process = folder, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> "Server":
        self.process = MlflowServer(f"sqlite:///{self.folder / 'server.db'}", str(self.folder / "artifacts"),
                                    serve_artifacts=True, port=self.port).process
        return self

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    if server.process.poll() is None:
        server.kill()


@pytest.fixture
def server(shared_server):
    """One server for the module's tests (each has its own run), started again if a test left it killed."""
    if shared_server.process.poll() is not None:
        shared_server.start()
    return shared_server


def outbox_of(runs: Path) -> Path | None:
    found = sorted(runs.glob("**/tracking_outbox/outbox.jsonl"))
    return found[0] if found else None


def records(runs: Path) -> list[dict]:
    outbox = outbox_of(runs)
    return [json.loads(line) for line in outbox.read_text().splitlines()] if outbox else []


def wait_for_records(runs: Path, at_least: int, job: subprocess.Popen, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        count = len(records(runs))
        if count >= at_least:
            return count
        if job.poll() is not None:
            raise AssertionError(f"the run ended (rc {job.returncode}) at {count} records:\n{job.stderr.read()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"fewer than {at_least} tracking records in {timeout} s")


def start_run(tmp_path: Path, uri: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RLHF_EXP_RUNS_DIR": str(tmp_path / "runs")}
    return subprocess.Popen([sys.executable, "-m", "rlhf_exp", *STEPS, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged_on_server(uri: str, run_id: str, names) -> set[tuple[str, int]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return {(name, m.step) for name in names for m in client.get_metric_history(run_id, name)}


def metrics_in(outbox: list[dict]) -> set[tuple[str, int]]:
    return {(name, r["step"]) for r in outbox if r["kind"] == "metrics" for name in r["values"]}


def test_server_killed_mid_run_and_restarted_loses_no_metric_and_never_stops_training(tmp_path, server):
    job = start_run(tmp_path, server.uri, "stage.max_steps=80")
    before = wait_for_records(tmp_path / "runs", 8, job)
    server.kill()
    killed_at = time.time()
    during = wait_for_records(tmp_path / "runs", before + 15, job)  # steps go on while it is down
    assert time.time() - killed_at < 60
    server.start()
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-3000:]
    assert "could not send" in out + err  # the outage was seen (Hydra logs to stdout), and did not stop the run
    outbox = records(tmp_path / "runs")
    run_id = json.loads(next((tmp_path / "runs").glob("**/tracking.json")).read_text())["run_id"]
    sent = metrics_in(outbox)
    names = {name for name, _ in sent}
    on_server = logged_on_server(server.uri, run_id, names)
    assert len(sent) >= 80 + during - before - 15 and {s for n, s in sent if n == "train/loss"} == set(range(1, 81))
    assert on_server == sent, f"lost: {sorted(sent - on_server)[:10]}"
    from mlflow.tracking import MlflowClient

    run = MlflowClient(server.uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint_dir"]
    print(f"outage: {len(sent)} metric values logged, {len(on_server)} on the server, 0 lost; "
          f"{during - before} records written while the server was down")


def test_what_the_server_missed_at_the_end_is_sent_by_rlhf_exp_sync(tmp_path, server, capsys):
    job = start_run(tmp_path, server.uri, "stage.max_steps=30", "tracking.flush_timeout_s=2")
    wait_for_records(tmp_path / "runs", 5, job)
    server.kill()
    _, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-3000:]  # the run trained to the end without its tracker
    run_dir = next((tmp_path / "runs").glob("**/tracking.json")).parent
    assert f"python -m rlhf_exp.sync {run_dir}" in err
    server.start()
    done = subprocess.run([sys.executable, "-m", "rlhf_exp.sync", str(run_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    outbox = records(tmp_path / "runs")
    run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    sent = metrics_in(outbox)
    assert logged_on_server(server.uri, run_id, {n for n, _ in sent}) == sent
    from mlflow.tracking import MlflowClient

    run = MlflowClient(server.uri).get_run(run_id)
    assert run.info.status == "FINISHED" and "plots/training_curves.png" in {
        f.path for f in MlflowClient(server.uri).list_artifacts(run_id, "plots")}
    from rlhf_exp.sync import main as sync_again  # (in this process: the command itself ran above)

    assert sync_again([str(run_dir)]) == 0 and "sent 0 records" in capsys.readouterr().out  # nothing is sent twice


def test_nothing_listening_at_start_is_one_line_and_exit_2_in_seconds(tmp_path):
    started = time.time()
    done = run_cli(*STEPS, env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
                                "RLHF_EXP_RUNS_DIR": str(tmp_path / "runs")})
    assert done.returncode == 2
    assert "tracking server http://127.0.0.1:" in done.stderr and "not reachable" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.time() - started < 90  # the CLI's imports; the check itself takes under 5 s
