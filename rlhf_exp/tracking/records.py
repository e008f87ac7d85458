"""What a run folder records of its tracker run, and the tag a child run names its parent by: the small
facts that the launchers, `export` and `sync` all read, in one place."""

from __future__ import annotations

import json
from pathlib import Path

RUN_RECORD = "tracking.json"  # in a run folder: {"run_id", "tracking_uri" (password redacted)}
PARENT_TAG = "mlflow.parentRunId"  # what MLflow's UI nests child runs (a sweep's jobs, a pipeline's stages) by


def run_record(run_dir: Path) -> dict:
    """The folder's RUN_RECORD, or {} where it has none (a run that never reached its tracker)."""
    try:
        return json.loads((Path(run_dir) / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return {}


def run_id_of(run_dir: Path) -> str | None:
    """The tracker run that run folder `run_dir` logged to."""
    return run_record(run_dir).get("run_id")
