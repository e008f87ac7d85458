"""MLflow through an explicit `MlflowClient` and run id, never the fluent API's global
"active run": many runs can share one process (sweeps with the basic launcher, tests) and
a failed run cannot leave the next one "already active"."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from filelock import FileLock
from omegaconf import DictConfig

from rlhf_exp.errors import UserInputError
from rlhf_exp.tracking.base import Tracker
from rlhf_exp.tracking.outbox import OUTBOX, Outbox, now_ms
from rlhf_exp.tracking.records import PARENT_TAG

log = logging.getLogger(__name__)

_MAX_PARAM_CHARS = 6000  # MLflow cuts longer values; the full config is the YAML artifact
_PARAMS_PER_BATCH = 100
# MLflow 3's UI shows an experiment without this tag as a GenAI "Evaluations" page (no param or metric
# columns); these are training runs
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


# what a stop writes on its run (launch/run.py); a resume moves them into the run's stop_history
STOP_TAGS = ("stopped_by", "stopped_at_step")

# MLflow 3's UI opens on its GenAI side (traces, evaluations) unless the address asks for the model-training one
UI_TRAINING_SIDE = "workflowType=machine_learning"


def ui_address(uri: str, route: str) -> str:
    """The address of `route` (/experiments/<id>/runs/<run id>) in the UI of the server the runs went to: that
    server where the tracking URI is one (credentials left out), else `make ui`'s, on the model-training side."""
    from rlhf_exp.redact import redact_text

    base = redact_text(uri.rstrip("/")) if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#{route}{'&' if '?' in route else '?'}{UI_TRAINING_SIDE}"


def save_runs_view(tracker, key: str, columns: list[str], search_filter: str,
                   order_by: tuple[str, bool] | None = None) -> str | None:
    """A runs-table view saved in the tracker run's experiment as MLflow's own shared views are (the
    `mlflow.sharedViewState.<key>` tag): the runs `search_filter` matches, listed flat (MLflow nests children
    under a collapsed parent only while no filter is set, and leaves a parent's expansion out of what a shared
    view restores), `columns` shown (the UI's "Columns" menu would start from none), sorted by `order_by`
    ((a column such as metrics.`objective`, ascending)) if given. Returns its route
    (/experiments/<id>/runs?viewStateShareKey=<key>), None if it could not."""
    state = {"selectedColumns": columns, "searchFilter": search_filter}
    if order_by:
        state.update(orderByKey=order_by[0], orderByAsc=order_by[1])
    try:
        experiment_id = tracker.client.get_run(tracker.run_id).info.experiment_id
        tracker.client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{key}", json.dumps(state))
    except Exception as error:  # a convenience: the runs are tracked without it
        log.warning("could not save the MLflow UI view %s (%s)", key, error)
        return None
    return f"/experiments/{experiment_id}/runs?viewStateShareKey={key}"


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


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """An http(s) tracking server must answer a connection within seconds (MLflow's own retries take
    minutes before they fail): else one line naming it, exit 2."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
    except OSError as error:
        raise UserInputError(f"tracking server {uri} is not reachable ({error.strerror or error}): start it "
                             f"(mlflow server --host 127.0.0.1 --port {port}), point MLFLOW_TRACKING_URI "
                             "elsewhere, or run with tracking=none") from None


def send_record(client, run_id: str, record: dict[str, Any]) -> None:
    """One outbox record (rlhf_exp.tracking.outbox) to MLflow: to the run it names (records written before
    they named one: to `run_id`)."""
    from mlflow.entities import Metric, RunTag

    run_id = record.get("run_id") or run_id
    kind = record["kind"]
    if kind == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, float(v), record["time"], record["step"])
                                          for k, v in record["values"].items()])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in record["tags"].items()])
    elif kind == "artifact":
        client.log_artifact(run_id, record["path"], record.get("artifact_path"))
    elif kind == "text":
        client.log_text(run_id, record["text"], record["artifact_file"])
    elif kind == "table":
        client.log_table(run_id, data=record["data"], artifact_file=record["artifact_file"])
    elif kind == "dataset":
        from mlflow.entities import Dataset, DatasetInput, InputTag

        source_type = "hugging_face" if record["source"].startswith("hub:") else "local"
        dataset = Dataset(record["name"], record["digest"][:36], source_type, json.dumps({"uri": record["source"]}),
                          profile=json.dumps({"num_rows": record["rows"]}))
        client.log_inputs(run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", record["context"])])])
    elif kind == "model":
        from rlhf_exp.tracking.logged_models import upload

        upload(client, run_id, record)
        shutil.rmtree(record["path"], ignore_errors=True)  # a model's weights: the artifact store has them now
    elif kind == "finish":
        client.set_terminated(run_id, status=record["status"], end_time=record["time"])
    else:
        raise ValueError(f"unknown tracking record {kind!r}")


class MlflowTracker(Tracker):
    def __init__(self, tracking: DictConfig, root_dir: str):
        self.uri = tracking_uri(tracking, root_dir)
        check_reachable(self.uri)
        # one try per call, short: the outbox retries, and training never waits minutes on a dead server
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(tracking.get("request_timeout_s") or 10)))
        self.client = ready_client(self.uri)
        self.experiment_name = tracking.experiment_name
        self.artifact_location = artifact_location(tracking, self.uri)
        self.flush_timeout_s = float(tracking.get("flush_timeout_s") or 0)
        self.system_metrics_s = tracking.get("system_metrics_s")
        self.system_monitor = None
        self.run_id = None
        self._before_start: list[dict[str, Any]] = []
        self.outbox: Outbox | None = None
        self.run_dir: Path | None = None

    def experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment_name)
        if found is None:
            try:
                return self.client.create_experiment(self.experiment_name, artifact_location=self.artifact_location,
                                                     tags=EXPERIMENT_KIND)
            except Exception:  # created meanwhile by a parallel job
                found = self.client.get_experiment_by_name(self.experiment_name)
        if not any(key in found.tags for key in EXPERIMENT_KIND):  # made by an older version, or by hand
            for key, value in EXPERIMENT_KIND.items():
                self.client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str], run_dir: Path | None = None,
              continue_run: str | None = None, parent_run_id: str | None = None) -> None:
        from mlflow.entities import Param

        values = {k: str(v)[:_MAX_PARAM_CHARS] for k, v in params.items()}
        logged = self._continue(continue_run, values, tags) if continue_run is not None else None
        if logged is not None:
            values = {k: v for k, v in values.items() if k not in logged}
        elif parent_run_id is not None:  # a sweep's job: nested under its parent, in the parent's experiment
            experiment = self.client.get_run(parent_run_id).info.experiment_id
            self.run_id = self.client.create_run(experiment, run_name=run_name,
                                                 tags={**tags, PARENT_TAG: parent_run_id}).info.run_id
        else:
            self.run_id = self.client.create_run(self.experiment_id(), run_name=run_name, tags=tags).info.run_id
        items = [Param(k, v) for k, v in sorted(values.items())]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + _PARAMS_PER_BATCH])
        if run_dir is not None:  # from here on, calls go through the run folder's outbox
            self.run_dir = Path(run_dir)
            self.outbox = Outbox(self.run_dir / OUTBOX, self._send)
        early, self._before_start = self._before_start, []
        for record in early:  # made while the run's data and weights loaded
            self._emit(record)
        if self.system_metrics_s:
            self._monitor_system(resumed=logged is not None)
        log.info("MLflow run %s in %s (experiment %r)", self.run_id, self.uri, self.experiment_name)

    def _continue(self, run_id: str, params: dict[str, str], tags: dict[str, str]) -> dict[str, str] | None:
        """Reopen run `run_id` for a resumed run: its history goes on at the resumed step. Params MLflow
        cannot change (stage.max_steps, stage.resume_from) are kept as `resumed.<key>` tags. Returns the
        params it has (None: it is gone, start a new run)."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:  # deleted meanwhile: a new run
            return None
        self.run_id = run_id
        changed = {f"resumed.{k}": v for k, v in params.items() if k in run.data.params and run.data.params[k] != v}
        count = int(run.data.tags.get("resume_count", "0")) + 1
        extra = {"resume_count": str(count)}
        if run.info.status == "RUNNING":  # nobody closed it: its process was SIGKILLed (or OOM-killed)
            extra["killed_note"] = ("its process died without closing it (SIGKILL, an OOM kill); continued by "
                                    f"resume {count} from {tags.get('resumed_from')}")
        if "stopped_by" in run.data.tags:  # a past stop is history now, not a description of the run
            past = f"{run.data.tags['stopped_by']} at step {run.data.tags.get('stopped_at_step', '?')}"
            earlier = run.data.tags.get("stop_history")
            extra["stop_history"] = f"{earlier}; {past}" if earlier else past
            for key in STOP_TAGS:
                if key in run.data.tags:
                    self.client.delete_tag(run_id, key)
        self.client.update_run(run_id, status="RUNNING")
        for key, value in {**tags, **changed, **extra}.items():
            self.client.set_tag(run_id, key, str(value))
        log.info("continuing MLflow run %s (resume %d)", run_id, count)
        return dict(run.data.params)

    def _monitor_system(self, resumed: bool) -> None:
        """MLflow's system metrics (system/cpu_utilization_percentage, memory, disk, network; GPU utilization and
        memory where nvidia-ml-py is installed) every tracking.system_metrics_s seconds, best effort: straight
        to the tracker, not through the outbox (a sample lost in an outage is not worth a retry)."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start / stop notices
        self.system_monitor = SystemMetricsMonitor(self.run_id, sampling_interval=float(self.system_metrics_s),
                                                   resume_logging=resumed, tracking_uri=self.uri)
        self.system_monitor.start()

    def _send(self, record: dict[str, Any]) -> None:
        send_record(self.client, self.run_id, record)

    def _emit(self, record: dict[str, Any]) -> None:
        if self.run_id is None:  # before start: kept until the run exists
            self._before_start.append(record)
            return
        record["run_id"] = self.run_id
        if self.outbox is not None:
            self.outbox.put(record)
        else:
            self._send(record)

    def _keep(self, name: str) -> Path:
        """A file for content the outbox sends later; a temporary folder without a run folder."""
        if self.outbox is not None:
            return self.outbox.file_for(name)
        folder = Path(tempfile.mkdtemp(prefix="rlhf_exp-artifact-"))
        return folder / name

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        if values:
            self._emit({"kind": "metrics", "step": int(step), "time": now_ms(), "values": values})

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self._emit({"kind": "artifact", "path": str(Path(local_path).resolve()), "artifact_path": artifact_path})

    def log_figure(self, figure, artifact_file: str) -> None:
        path = self._keep(Path(artifact_file).name)
        figure.savefig(path)
        self._emit({"kind": "artifact", "path": str(path), "artifact_path": str(Path(artifact_file).parent)
                    if Path(artifact_file).parent != Path(".") else None})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._emit({"kind": "text", "text": text, "artifact_file": artifact_file})

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        if rows:
            columns = {key: [row.get(key) for row in rows] for key in rows[0]}
            self._emit({"kind": "table", "data": columns, "artifact_file": artifact_file})

    def set_tags(self, tags: dict[str, str]) -> None:
        if tags:
            self._emit({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_dataset(self, name: str, digest: str, source: str, context: str, rows: int) -> None:
        self._emit({"kind": "dataset", "name": name, "digest": digest, "source": source, "context": context,
                    "rows": int(rows)})

    def log_model(self, folder: Path, name: str, step: int, register_as: str | None = None) -> None:
        from rlhf_exp.models.reward import reward_mean_of
        from rlhf_exp.tracking.logged_models import model_name, model_type_of, save_policy, save_reward_model

        model_type = model_type_of(folder)
        out = self._keep("mlflow_model")
        if model_type == "reward-model":
            save_reward_model(folder, out, reward_mean_of(folder))
        else:
            save_policy(folder, out, name)
        self._emit({"kind": "model", "path": str(out), "name": model_name(name), "model_type": model_type,
                    "step": int(step), "register_as": register_as, "key": secrets.token_hex(8)})

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
        if self.system_monitor is not None:
            try:
                self.system_monitor.finish()
            except Exception:  # never mask the error that ended the run
                log.exception("could not stop the system metrics of run %s", self.run_id)
        try:
            self._emit({"kind": "finish", "status": status, "time": now_ms()})
        except Exception:  # never mask the error that ended the run
            log.exception("could not close MLflow run %s as %s", self.run_id, status)
        if self.outbox is None:
            return
        left = self.outbox.close(self.flush_timeout_s)
        failed = dict(self.outbox.failed_artifacts)
        if failed:
            first = next(iter(failed.values()))
            message = (f"tracking: {len(failed)} artifacts of run {self.run_id} could not be stored ({first}); the run's "
                       f"metrics and its status went on without them. They are kept in {self.outbox.folder}: send "
                       f"them with: python -m rlhf_exp.sync {self.run_dir}")
            log.warning("%s", message)
            print(message, file=sys.stderr)
        elif left:
            message = (f"tracking: {left} records of run {self.run_id} are not in MLflow yet ({self.uri} did not take "
                       f"them within tracking.flush_timeout_s={self.flush_timeout_s:g}); they are kept in "
                       f"{self.outbox.folder}. Send them with: python -m rlhf_exp.sync {self.run_dir}")
            log.warning("%s", message)
            print(message, file=sys.stderr)
