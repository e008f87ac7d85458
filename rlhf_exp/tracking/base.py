"""The tracker interface. This base logs nothing (`tracking=none`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Tracker:
    run_id: str | None = None
    uri: str | None = None  # where the runs are (a tracking URI)

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str], run_dir: Path | None = None,
              continue_run: str | None = None, parent_run_id: str | None = None) -> None:
        """Create the run (or continue run `continue_run`, when resuming it), a child of `parent_run_id` (a
        sweep's parent run) in that run's experiment if given; with `run_dir`, later calls are kept in its
        outbox until the tracker has them."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        pass

    def log_figure(self, figure, artifact_file: str) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_dataset(self, name: str, digest: str, source: str, context: str, rows: int) -> None:
        """A data set the run read (`context`: train / held-out), as a run input."""

    def log_model(self, folder: Path, name: str, step: int, register_as: str | None = None) -> None:
        """An exported model folder (rlhf_exp.export) as a model of the run, registered as `register_as` if set."""

    def close_abandoned(self, run_id: str, note: str) -> bool:
        """Mark run `run_id`, if the tracker still shows it RUNNING (its process was SIGKILLed), KILLED."""
        return False

    def finish(self, status: str) -> None:
        """Close the run as FINISHED, FAILED or KILLED. Called in `finally`: must not raise."""
