"""The tracking outbox on a shared machine: an artifact store that refuses writes must not hold back a metric
or the run's status, records a killed process never sent are the ones sent next, and a run killed before its
first checkpoint does not stay RUNNING forever."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import ROOT, TINY, mlflow_runs, run_until_killed, tiny_config, tracked_env
from rlhf_exp.launch.run import run
from rlhf_exp.tracking.outbox import OUTBOX, Outbox, pending


def test_an_artifact_store_that_refuses_writes_holds_back_no_metric_and_no_status(tmp_path, capsys):
    """Before: the outbox sent in strict order and stopped at the first artifact: the run exited 0 and MLflow
    showed it RUNNING with 0 metrics. A regular file where the store's folder should be refuses every write,
    whoever the user (a read-only folder does not stop root)."""
    blocker = tmp_path / "store"
    blocker.write_text("a file, not a folder")
    run(tiny_config(tmp_path, "stage.max_steps=3", "stage.num_samples=0", "stage.eval_every=null",
                    f"tracking.artifact_location={blocker / 'artifacts'}", "tracking.flush_timeout_s=3"))
    client, [tracked] = mlflow_runs(tmp_path / "mlflow.db")
    assert tracked.info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(tracked.info.run_id, "train/loss")} == {1, 2, 3}
    assert "eval/loss" in tracked.data.metrics and tracked.data.tags["checkpoint_dir"]
    run_dir = Path(tracked.data.tags["run_dir"])
    said = capsys.readouterr().err
    assert f"artifacts of run {tracked.info.run_id} could not be stored (" in said
    assert f"send them with: python -m rlhf_exp.sync {run_dir}" in said
    left = pending(run_dir / OUTBOX)
    assert left and {record["kind"] for _, record in left} <= {"artifact", "text", "table"}

    # the store is mended: a sync sends exactly what was left, and the config artifact arrives
    blocker.unlink()
    done = subprocess.run([sys.executable, "-m", "rlhf_exp.sync", str(run_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"{run_dir}: sent {len(left)} records")
    assert not pending(run_dir / OUTBOX)
    assert "config" in {a.path for a in client.list_artifacts(tracked.info.run_id)}


def test_records_a_killed_process_never_sent_are_sent_first_by_the_next_outbox_in_its_folder(tmp_path):
    """Before: the next process's outbox counted sent records from the killed one's count and sent only its
    own, so the killed process's unsent records were never sent and `sync` re-sent the newest ones."""
    def server_down(record):
        raise ConnectionError("server down")

    first = Outbox(tmp_path / OUTBOX, server_down)
    for step in (1, 2, 3):
        first.put({"kind": "metrics", "step": step, "values": {"loss": float(step)}})
    assert first.close(0.2) == 3  # as a SIGKILL leaves it: nothing sent
    with (tmp_path / OUTBOX / "outbox.jsonl").open("a") as out:
        out.write('{"kind": "metrics", "st')  # and a line cut off mid-write
    got = []
    second = Outbox(tmp_path / OUTBOX, lambda record: got.append(record["step"]))
    second.put({"kind": "metrics", "step": 4, "values": {"loss": 4.0}})
    assert second.close(10) == 1  # the cut-off line, which can never be sent
    assert got == [1, 2, 3, 4]
    assert pending(tmp_path / OUTBOX) == []


def test_a_run_killed_before_its_first_checkpoint_is_closed_killed_at_the_next_start(tmp_path):
    """Before: nothing resumes a run SIGKILLed before its first checkpoint, so it stayed RUNNING forever."""
    env = tracked_env(tmp_path)
    folder, _ = run_until_killed(tmp_path, 1, [*TINY, "stage.max_steps=4", "stage.num_samples=0"], hang_at_step=1,
                                 env=env)
    assert not (folder / "checkpoints").exists()
    _, [killed] = mlflow_runs(tmp_path / "m.db")
    assert killed.info.status == "RUNNING"
    lock_holder = json.loads((folder / ".run.lock").read_text())
    # the next run in the same project, of anything
    run(tiny_config(tmp_path, "stage.max_steps=1", "stage.num_samples=0", f"paths.runs_dir={tmp_path / 'runs'}",
                    f"tracking.tracking_uri={env['MLFLOW_TRACKING_URI']}"))
    _, runs = mlflow_runs(tmp_path / "m.db")
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]
    note = runs[0].data.tags["killed_note"]
    assert note.startswith(f"its process ({lock_holder['pid']} on {lock_holder['host']}) died without closing it")
