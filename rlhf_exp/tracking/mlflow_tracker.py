"""MLflow through an explicit `MlflowClient` and run id, never the fluent API's global
"active run": many runs can share one process (sweeps with the basic launcher, tests) and
a failed run cannot leave the next one "already active"."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from filelock import FileLock
from omegaconf import DictConfig

from rlhf_exp.errors import UserInputError
from rlhf_exp.tracking.base import Tracker

log = logging.getLogger(__name__)

_MAX_PARAM_CHARS = 6000  # MLflow cuts longer values; the full config is the YAML artifact
_PARAMS_PER_BATCH = 100


def tracking_uri(tracking: DictConfig, root_dir: str) -> str:
    """tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else an absolute SQLite file in the project."""
    return (tracking.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{Path(root_dir).resolve() / 'mlflow.db'}")


def artifact_location(tracking: DictConfig, uri: str) -> str | None:
    """tracking.artifact_location, else `mlartifacts/` beside a SQLite file (None: the server decides)."""
    if tracking.get("artifact_location"):
        return Path(tracking.artifact_location).resolve().as_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def leftover_migration_tables(db: Path) -> list[str]:
    """Alembic's `_alembic_tmp_*` tables: they live only while a migration runs, so one found under the
    lock was left by a migration that died (and makes every later one fail with "already exists")."""
    with closing(sqlite3.connect(db)) as conn:
        return [name for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE '\\_alembic\\_tmp\\_%' ESCAPE '\\'")]


def upgrade_sqlite(uri: str, db: Path, why: str) -> None:
    """`mlflow db upgrade` on a copy-backed database; refuses with what to do if it fails."""
    backup = db.with_name(f"{db.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.copy2(db, backup)
    leftovers = leftover_migration_tables(db)
    with closing(sqlite3.connect(db)) as conn:
        for table in leftovers:
            conn.execute(f'DROP TABLE "{table}"')
        conn.commit()
    log.warning("tracking database %s: %s; repairing it (backup: %s)", db, why, backup)
    done = subprocess.run([sys.executable, "-m", "mlflow", "db", "upgrade", uri], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserInputError(f"tracking database {db} is half-migrated ({why}) and could not be repaired "
                             f"({last}). Move it aside (mv {db} {db}.broken) to start a new one, or restore "
                             f"{backup}, or set tracking.tracking_uri to another database")


def ready_client(uri: str):
    """An MlflowClient whose database exists and is migrated. A new SQLite file is created and migrated once,
    under a file lock beside it: parallel first starts (a joblib sweep, several shells) otherwise race
    in MLflow's migrations and leave the file half-migrated. A half-migrated file is repaired, or refused."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is None:
        return MlflowClient(tracking_uri=uri)
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock", timeout=600):
        if db.is_file() and db.stat().st_size and leftover_migration_tables(db):
            upgrade_sqlite(uri, db, "a migration died part-way: its _alembic_tmp_ tables are still there")
        client = MlflowClient(tracking_uri=uri)
        try:
            client.search_experiments(max_results=1)  # opens the store: creates and migrates a new file
        except MlflowException as error:
            if "out-of-date database schema" not in str(error):
                raise
            upgrade_sqlite(uri, db, "its schema is older than this MLflow's")
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
    return client


class MlflowTracker(Tracker):
    def __init__(self, tracking: DictConfig, root_dir: str):
        self.uri = tracking_uri(tracking, root_dir)
        self.client = ready_client(self.uri)
        self.experiment_name = tracking.experiment_name
        self.artifact_location = artifact_location(tracking, self.uri)
        self.run_id = None

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment_name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment_name, artifact_location=self.artifact_location)
        except Exception:  # created meanwhile by a parallel job
            return self.client.get_experiment_by_name(self.experiment_name).experiment_id

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        from mlflow.entities import Param

        run = self.client.create_run(self._experiment_id(), run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:_MAX_PARAM_CHARS]) for k, v in sorted(params.items())]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + _PARAMS_PER_BATCH])
        log.info("MLflow run %s in %s (experiment %r)", self.run_id, self.uri, self.experiment_name)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, local_path, artifact_path)

    def log_figure(self, figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        if rows:
            columns = {key: [row.get(key) for row in rows] for key in rows[0]}
            self.client.log_table(self.run_id, data=columns, artifact_file=artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def close_abandoned(self, run_id: str, note: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            if self.client.get_run(run_id).info.status != "RUNNING":
                return False
        except MlflowException:  # deleted, or another tracking database
            return False
        self.client.set_tag(run_id, "killed_note", note)
        self.client.set_terminated(run_id, status="KILLED")
        return True

    def finish(self, status: str) -> None:
        if self.run_id is None:
            return
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception:  # never mask the error that ended the run
            log.exception("could not close MLflow run %s as %s", self.run_id, status)
