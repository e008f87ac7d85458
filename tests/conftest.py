"""Shared test helpers: compose the real config, shrink it to a tiny model, run it."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rlhf_exp.config import compose_config  # noqa: E402

# A run small enough for a few seconds on 2 cores, with every code path of a real run.
TINY = [
    "model=tiny",
    "hardware=cpu",
    "hardware.precision=fp32",
    "stage.max_steps=3",
    "stage.batch_size=4",
    "hardware.micro_batch_size.sft=2",
    "stage.eval_examples=8",
    "stage.num_samples=2",
    "stage.generation.max_new_tokens=8",
    "data.max_prompt_tokens=64",
    "data.max_response_tokens=16",
]


_EMPTY_MLFLOW_DB: list[Path] = []


def empty_mlflow_db(path: Path) -> Path:
    """`path` as a copy of an empty MLflow database (unless it exists): creating one runs its ~100
    schema migrations (1-2 s), and nearly every test tracks into a database of its own. Tests
    that run the CLI (`tracked_env`) still let MLflow create theirs."""
    if not _EMPTY_MLFLOW_DB:
        from mlflow.tracking import MlflowClient

        folder = Path(tempfile.mkdtemp(prefix="rlhf_exp-mlflow-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        MlflowClient(f"sqlite:///{folder / 'empty.db'}").search_experiments()
        _EMPTY_MLFLOW_DB.append(folder / "empty.db")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_EMPTY_MLFLOW_DB[0], path)
    return path


def tiny_config(tmp_path: Path, *overrides: str):
    """The real composed config, shrunk, with runs and MLflow inside `tmp_path`."""
    empty_mlflow_db(tmp_path / "mlflow.db")
    return compose_config([
        *TINY,
        f"paths.runs_dir={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        *overrides,
    ])


@pytest.fixture(scope="session")
def tokenizer():
    from rlhf_exp.models import load_tokenizer

    cfg = compose_config(["model=tiny"])
    return load_tokenizer(cfg.model, cfg.paths.cache_dir)


def mlflow_runs(db_path: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db_path}")
    experiment = client.get_experiment_by_name("rlhf_exp")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"]) if experiment else []
    return client, runs


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m rlhf_exp <args>` in a subprocess, as a user types it."""
    return subprocess.run([sys.executable, "-m", "rlhf_exp", *args], cwd=cwd or Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=900)


def tracked_env(tmp_path: Path) -> dict:
    """MLflow and run folders inside tmp_path."""
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}", "RLHF_EXP_RUNS_DIR": str(tmp_path / "runs")}
