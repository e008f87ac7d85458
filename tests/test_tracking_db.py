"""The tracking database at start-up (issue 11.1): parallel first starts and half-migrated files."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from contextlib import closing

import pytest
from omegaconf import OmegaConf

from helpers import ROOT, mlflow_runs

# Imports first, then every process waits for the same instant, so the four create the database
# together (as a joblib sweep or four shells do) rather than one after another.
_START_ONE_RUN = """
import sys, time
from omegaconf import OmegaConf
from rlhf_exp.tracking.mlflow_tracker import MlflowTracker
db, start_at, name = sys.argv[1], float(sys.argv[2]), sys.argv[3]
tracking = OmegaConf.create({"tracking_uri": f"sqlite:///{db}", "experiment_name": "rlhf_exp",
                             "artifact_location": None})
time.sleep(max(0.0, start_at - time.time()))
tracker = MlflowTracker(tracking, ".")
tracker.start(name, {"job": name}, {})
tracker.log_metrics({"train/loss": 1.0}, step=1)
tracker.finish("FINISHED")
print("started", tracker.run_id)
"""


def test_four_runs_started_at_once_on_a_new_database_all_start(tmp_path):
    """Before: MLflow's migrations raced ("Online migration expected to match one row", "table
    _alembic_tmp_... already exists"), most of the four crashed and the file was left half-migrated."""
    db = tmp_path / "mlflow.db"
    start_at = time.time() + 12  # after every process has imported mlflow (a few seconds each)
    jobs = [subprocess.Popen([sys.executable, "-c", _START_ONE_RUN, str(db), str(start_at), f"job{i}"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(4)]
    outputs = [job.communicate(timeout=300) for job in jobs]
    for job, (out, err) in zip(jobs, outputs):
        assert job.returncode == 0, err[-2000:]
        assert "started" in out
    _, runs = mlflow_runs(db)
    assert sorted(run.data.params["job"] for run in runs) == ["job0", "job1", "job2", "job3"]
    assert all(run.info.status == "FINISHED" and run.data.metrics["train/loss"] == 1.0 for run in runs)


def half_migrated_database(path):
    """What a migration killed part-way leaves: the schema a few revisions behind, with the temporary
    table of the migration that was running (SQLite alters tables by copying them)."""
    import sqlalchemy
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

    url = f"sqlite:///{path}"
    engine = sqlalchemy.create_engine(url)
    InitialBase.metadata.create_all(engine)
    config = _get_alembic_config(url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "27a6a02d2cf1")  # model version tags; the next ones alter model_versions
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE _alembic_tmp_model_versions AS SELECT * FROM model_versions")
    engine.dispose()
    return url


def test_a_half_migrated_database_is_repaired_at_start_with_a_backup(tmp_path):
    from mlflow.tracking import MlflowClient

    from rlhf_exp.tracking.mlflow_tracker import MlflowTracker

    db = tmp_path / "mlflow.db"
    url = half_migrated_database(db)
    with pytest.raises(Exception, match="_alembic_tmp_model_versions already exists"):  # every run, before
        MlflowClient(tracking_uri=url).search_experiments()
    tracking = OmegaConf.create({"tracking_uri": url, "experiment_name": "rlhf_exp", "artifact_location": None})
    tracker = MlflowTracker(tracking, str(tmp_path))
    tracker.start("after-repair", {"a": 1}, {})
    tracker.finish("FINISHED")
    _, runs = mlflow_runs(db)
    assert [run.info.run_name for run in runs] == ["after-repair"]
    with closing(sqlite3.connect(db)) as conn:
        assert not conn.execute("SELECT name FROM sqlite_master WHERE name LIKE '_alembic_tmp%'").fetchall()
    assert len(list(tmp_path.glob("mlflow.db.bak-*"))) == 1  # the file as it was, kept


def test_a_database_that_cannot_be_repaired_is_refused_with_what_to_do(tmp_path):
    from rlhf_exp.errors import UserInputError
    from rlhf_exp.tracking.mlflow_tracker import MlflowTracker

    db = tmp_path / "mlflow.db"
    url = half_migrated_database(db)
    with closing(sqlite3.connect(db)) as conn:  # the revision row gone too: nothing says where it stopped
        conn.execute("DELETE FROM alembic_version")
        conn.commit()
    tracking = OmegaConf.create({"tracking_uri": url, "experiment_name": "rlhf_exp", "artifact_location": None})
    with pytest.raises(UserInputError, match=r"half-migrated .*mv .*mlflow.db .*mlflow.db.broken"):
        MlflowTracker(tracking, str(tmp_path))
