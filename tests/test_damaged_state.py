"""What a run on a shared machine meets: a damaged newest checkpoint, a second process on the same run,
changed data between a run and its resume. Each must lose nothing and say what happened in one line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from helpers import mlflow_runs, tiny_config
from rlhf_exp.launch.run import run
from rlhf_exp.checkpoint import MANIFEST, checkpoint_damage, resume_point
from rlhf_exp.errors import ConfigError

RUN = ["stage.num_samples=0", "stage.eval_every=null", "stage.lr=1e-3"]


def truncate(path: Path, keep: int = 1000) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny SFT run of 3 steps with checkpoints step_000001, step_000002 and final, FINISHED in its own MLflow database."""
    tmp_path = tmp_path_factory.mktemp("finished")
    run(tiny_config(tmp_path, *RUN, "stage.max_steps=3", "stage.save_every=1"))
    _, [finished] = mlflow_runs(tmp_path / "mlflow.db")
    return tmp_path, Path(finished.data.tags["run_dir"])


def copied_run(finished_run, tmp_path: Path) -> Path:
    """A copy of the finished run's project (runs and MLflow database) in tmp_path / "project"."""
    import json
    import shutil

    source_root, run_dir = finished_run
    shutil.copytree(source_root, tmp_path / "project")
    copy = tmp_path / "project" / run_dir.relative_to(source_root)
    record = json.loads((copy / "tracking.json").read_text())
    record["tracking_uri"] = f"sqlite:///{tmp_path / 'project' / 'mlflow.db'}"
    (copy / "tracking.json").write_text(json.dumps(record))
    return copy


def test_every_checkpoint_has_a_manifest_that_a_changed_byte_fails(finished_run, tmp_path):
    import os

    _, original = finished_run
    mask = os.umask(0)
    os.umask(mask)
    # the weights as the umask makes files (huggingface_hub writes them 0600 through a private temporary file)
    assert (original / "checkpoints" / "step_000002" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    run_dir = copied_run(finished_run, tmp_path)
    step = run_dir / "checkpoints" / "step_000002"
    assert (step / MANIFEST).is_file() and checkpoint_damage(step) is None
    weights = step / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # the same size, one byte flipped: only the hash sees it
    weights.write_bytes(bytes(data))
    assert "sha256" in checkpoint_damage(step) and str(weights) in checkpoint_damage(step)
    other = run_dir / "checkpoints" / "step_000001"
    (other / "tokenizer.json").unlink()
    assert checkpoint_damage(other) == f"{other / 'tokenizer.json'} is missing"


def test_a_checkpoint_without_a_manifest_is_checked_by_its_safetensors_headers(finished_run, tmp_path):
    run_dir = copied_run(finished_run, tmp_path)
    step = run_dir / "checkpoints" / "step_000001"
    (step / MANIFEST).unlink()  # written before manifests
    assert checkpoint_damage(step) is None
    truncate(step / "model.safetensors", 50_000)
    assert "model.safetensors has 50000 bytes where its header says" in checkpoint_damage(step)


def test_a_damaged_newest_checkpoint_is_passed_over_for_the_newest_whole_one(finished_run, tmp_path, caplog):
    """Before: a truncated model.safetensors in the newest checkpoint died with a 39-line SafetensorError
    traceback after the MLflow run was reopened, turning a FINISHED run FAILED."""
    run_dir = copied_run(finished_run, tmp_path)
    project = tmp_path / "project"
    checkpoints = run_dir / "checkpoints"
    truncate(checkpoints / "final" / "model.safetensors")
    truncate(checkpoints / "step_000002" / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="rlhf_exp.checkpoint"):
        assert resume_point(run_dir) == checkpoints / "step_000001"
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("checkpoint final is damaged") and "resuming from step_000001" in m for m in said)
    assert any(m.startswith("checkpoint step_000002 is damaged") for m in said)

    # naming the damaged checkpoint itself: refused in one line naming the file, and MLflow is not touched
    client, [before] = mlflow_runs(project / "mlflow.db")
    with pytest.raises(ConfigError) as refused:
        run(tiny_config(project, *RUN, "stage.max_steps=4", f"stage.resume_from={checkpoints / 'final'}"))
    message = str(refused.value)
    assert "\n" not in message and str(checkpoints / "final" / "model.safetensors") in message
    assert f"stage.resume_from={run_dir} resumes from the run's newest checkpoint that is whole" in message
    _, [after] = mlflow_runs(project / "mlflow.db")
    assert after.info.status == "FINISHED" and after.data.tags == before.data.tags

    # the run folder: resumed from step 1, three more steps, FINISHED in the same MLflow run
    run(tiny_config(project, *RUN, "stage.max_steps=4", f"stage.resume_from={run_dir}"))
    client, [resumed] = mlflow_runs(project / "mlflow.db")
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["resumed_from"] == str(checkpoints / "step_000001")
    assert {m.step for m in client.get_metric_history(resumed.info.run_id, "train/loss")} == {1, 2, 3, 4}


def test_a_run_folder_with_only_damaged_checkpoints_is_refused_naming_each(finished_run, tmp_path):
    run_dir = copied_run(finished_run, tmp_path)
    for folder in (run_dir / "checkpoints").iterdir():
        truncate(folder / "model.safetensors")
    with pytest.raises(ConfigError) as refused:
        resume_point(run_dir)
    assert refused.value.key == "stage.resume_from"
    for name in ("final", "step_000002", "step_000001"):
        assert f"{name}: {run_dir / 'checkpoints' / name / 'model.safetensors'} has 1000 bytes" in str(refused.value)


@pytest.mark.parametrize("values", [1_000, 1_000_000])
def test_the_trainer_state_on_a_full_disk_is_one_line_naming_the_folder(tmp_path, values):
    """Before: torch.save(state, path) on a full disk raised `RuntimeError: [enforce fail at
    inline_container.cc] . unexpected pos 704 vs 598`, which the disk-full check did not know: a traceback.
    /dev/full answers every write with ENOSPC, as a full disk does."""
    import stat

    import torch

    from rlhf_exp.checkpoint import save_torch_file, written_into_place
    from rlhf_exp.errors import DiskFullError

    if not Path("/dev/full").exists() or not stat.S_ISCHR(Path("/dev/full").stat().st_mode):
        pytest.skip("this machine has no /dev/full device to stand for a full disk")
    folder = tmp_path / "checkpoints" / "final"
    with pytest.raises(DiskFullError) as full:
        with written_into_place(folder):
            save_torch_file({"weights": torch.zeros(values)}, Path("/dev/full"))
    message = str(full.value)
    assert "\n" not in message and message.startswith(f"no space left on the device while writing {folder} (")
    assert "MiB free" in message and not folder.with_name("final.partial").exists()


HOLD_THE_LOCK = """
import sys, time
from pathlib import Path
from rlhf_exp.run_lock import locked
with locked(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_process_on_a_run_folder_is_refused_and_a_dead_holders_lock_taken_over(finished_run, tmp_path,
                                                                                         caplog):
    """Before: two resumes of one folder started together both trained, overwrote each other's checkpoints,
    logged into one MLflow run twice, and the second wrote a false SIGKILL note on the first's run."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    from rlhf_exp.run_lock import LOCK_FILE, RunFolderBusy

    run_dir = copied_run(finished_run, tmp_path)
    project = tmp_path / "project"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        _, [before] = mlflow_runs(project / "mlflow.db")
        with pytest.raises(RunFolderBusy) as refused:
            run(tiny_config(project, *RUN, "stage.max_steps=4", f"stage.resume_from={run_dir}"))
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith(f"{run_dir} is in use by process {holder.pid} on {socket.gethostname()} (since ")
        _, [after] = mlflow_runs(project / "mlflow.db")  # the tracker never heard of the second process
        assert after.info.status == "FINISHED" and after.data.tags == before.data.tags
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # dies holding it: the kernel drops the lock, the file still names it
        holder.wait()
    assert str(holder.pid) in (run_dir / LOCK_FILE).read_text()
    with caplog.at_level(logging.WARNING, logger="rlhf_exp.run_lock"):
        run(tiny_config(project, *RUN, "stage.max_steps=4", f"stage.resume_from={run_dir}"))
    assert any(r.getMessage() == f"took over the run lock of {run_dir} from process {holder.pid} on "
               f"{socket.gethostname()}, which died without releasing it" for r in caplog.records)
    _, [resumed] = mlflow_runs(project / "mlflow.db")
    assert resumed.info.status == "FINISHED" and "killed_note" not in resumed.data.tags
    assert (run_dir / LOCK_FILE).read_text() == ""  # released when the run ended


def test_a_resume_on_changed_data_is_refused_naming_the_file_and_the_split(tmp_path):
    """Before: an edited training file of the same path and row count resumed silently on the new contents,
    held-out set included: only the row count was compared."""
    import json

    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "completion": f" It is {2 * i}."} for i in range(24)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    on_file = ["data=jsonl", f"data.path={data}", "data.val_size=4", *RUN]
    run(tiny_config(tmp_path, *on_file, "stage.max_steps=2", "stage.save_every=1"))
    _, [first] = mlflow_runs(tmp_path / "mlflow.db")
    step = Path(first.data.tags["run_dir"]) / "checkpoints" / "step_000001"

    rows[3]["completion"] = " It is six, give or take."  # one row edited, the same count
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ConfigError) as refused:
        run(tiny_config(tmp_path, *on_file, "stage.max_steps=3", f"stage.resume_from={step}"))
    message = str(refused.value)
    assert refused.value.key == "data.path" and "\n" not in message
    assert f"{data} is not the data {step} was trained on: the " in message and "(20 -> 20 rows, other contents)" in message
    assert "data.allow_changed_on_resume=true" in message
    _, [after] = mlflow_runs(tmp_path / "mlflow.db")  # refused before the tracker run was reopened
    assert after.info.status == "FINISHED" and after.data.tags == first.data.tags

    rows.append({"prompt": "Question 99: what is one plus one?", "completion": " Two."})
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ConfigError, match=r"changed"):
        run(tiny_config(tmp_path, *on_file, "stage.max_steps=3", f"stage.resume_from={step}"))
    # meant: it goes on with the changed data
    run(tiny_config(tmp_path, *on_file, "stage.max_steps=3", f"stage.resume_from={step}",
                    "data.allow_changed_on_resume=true"))
    _, [resumed] = mlflow_runs(tmp_path / "mlflow.db")
    assert resumed.info.status == "FINISHED" and resumed.data.tags["resumed_from"] == str(step)
