"""Experiment tracking: MLflow (default) or nothing. Stages talk to a `Tracker`, never to MLflow."""

from __future__ import annotations

from omegaconf import DictConfig

from rlhf_exp.errors import ConfigError
from rlhf_exp.tracking.base import Tracker


def make_tracker(tracking: DictConfig, root_dir: str) -> Tracker:
    if tracking.backend == "none":
        return Tracker()
    if tracking.backend == "mlflow":
        from rlhf_exp.tracking.mlflow_tracker import MlflowTracker

        return MlflowTracker(tracking, root_dir)
    raise ConfigError("tracking.backend", f"unknown backend {tracking.backend!r}; use mlflow or none")


__all__ = ["Tracker", "make_tracker"]
