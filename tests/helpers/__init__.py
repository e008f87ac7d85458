"""What several test files use: the real composed config shrunk to a tiny model, runs in-process or by
the CLI, MLflow read-back, and the stage settings the tests share."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

import torch

from rlhf_exp.config import compose_config, resolved
from rlhf_exp.tracking import Tracker

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

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

# preference pairs for rm / dpo
PAIRS = ["data=hh_rlhf", "data.val_size=16", "data.max_train_examples=64", "data.max_prompt_tokens=48",
         "data.max_response_tokens=16"]
GRPO = ["stage=grpo", "stage.batch_size=2", "stage.samples_per_prompt=4", "stage.generation.max_new_tokens=6",
        "stage.eval_examples=4", "stage.num_samples=2", "data.max_prompt_tokens=48", "reward.fn.target_tokens=3"]


def varied_reward(prompts, completions, completion_ids, **_):
    """Differs between samples of a random model, so advantages are non-zero (a user function by `_target_`)."""
    return [(sum(ids) % 7) / 7.0 for ids in completion_ids]


VARIED = ["reward.fn._target_=helpers.varied_reward", "allowed_targets=[helpers]", "~reward.fn.target_tokens", "reward.missing_eos_score=null"]
PPO = ["stage=ppo", "stage.batch_size=4", "stage.minibatch_size=2", "stage.ppo_epochs=2",
       "stage.generation.max_new_tokens=6", "stage.eval_examples=4", "stage.num_samples=1",
       "data.max_prompt_tokens=48", "hardware.micro_batch_size.ppo=2", "stage.lr=1e-3", *VARIED]
LORA = ["hardware.lora.enabled=true", "hardware.lora.r=4", "hardware.lora.dropout=0.0", "stage.lr=5e-3"]

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


def trainer_for(cls, tmp_path: Path, *overrides: str):
    """A stage trainer of the tiny config, set up (data, models, optimizer) but not run."""
    from rlhf_exp.launch.run import run_dir_for

    cfg = resolved(tiny_config(tmp_path, *overrides))
    trainer = cls(cfg, Tracker(), run_dir_for(cfg))
    trainer.setup()
    return trainer


def snapshot(model) -> dict[str, torch.Tensor]:
    """Trainable tensors, copied."""
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def mlflow_runs(db_path: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db_path}")
    experiments = [e.experiment_id for e in client.search_experiments()]  # one per stage (rlhf_exp/<stage>)
    runs = client.search_runs(experiments, order_by=["attributes.start_time ASC"], max_results=10_000)
    return client, runs


def metric_history(client, run, name: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)]


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m rlhf_exp <args>` in a subprocess, as a user types it."""
    return subprocess.run([sys.executable, "-m", "rlhf_exp", *args], cwd=cwd or ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900)


def tracked_env(tmp_path: Path) -> dict:
    """MLflow and run folders inside tmp_path (the database a copy of an empty one, as in tiny_config:
    tests/test_soak.py and tests/test_tracking_db.py are where the CLI creates and migrates its own)."""
    empty_mlflow_db(tmp_path / "m.db")
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}", "RLHF_EXP_RUNS_DIR": str(tmp_path / "runs")}


def run_until_killed(tmp_path: Path, nproc: int, args: list[str], hang_at_step: int, env: dict,
                     meanwhile: Callable[[], T] | None = None) -> tuple[Path, T | None]:
    """Start `python -m rlhf_exp <args>` (under torchrun with `nproc` > 1), let it train and log step
    `hang_at_step` (helpers/hang_at_step.py), then SIGKILL every process of it, as a preemption or an
    OOM kill would. Returns its run folder, and what `meanwhile` (run here while the job starts up:
    its imports use one core) returned."""
    markers = Path(tempfile.mkdtemp(dir=tmp_path, prefix="hung-"))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    env = {**os.environ, **env, "HANG_AT_STEP": str(hang_at_step), "HANG_MARKER_DIR": str(markers)}
    env.setdefault("OMP_NUM_THREADS", str(1 if nproc > 1 else torch.get_num_threads()))  # as the runs it is compared with
    log_path = markers / "output.log"
    with open(log_path, "w") as output:
        job = subprocess.Popen([*launcher, str(Path(__file__).with_name("hang_at_step.py")), *args], cwd=ROOT,
                               env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            result = meanwhile() if meanwhile is not None else None
        except BaseException:
            os.killpg(job.pid, signal.SIGKILL)
            raise
        deadline = time.time() + 600
        while len(list(markers.glob("rank*"))) < nproc:
            if job.poll() is not None or time.time() > deadline:
                if job.poll() is None:
                    os.killpg(job.pid, signal.SIGKILL)
                raise AssertionError(f"the run ended (rc {job.returncode}) before step {hang_at_step}:\n"
                                     f"{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        # every rank and the launcher, none of them told (torchrun starts each rank in a session of its own)
        ranks = [int(marker.read_text()) for marker in markers.glob("rank*")]
        os.killpg(job.pid, signal.SIGKILL)
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        job.wait(timeout=60)
    [record] = Path(env["RLHF_EXP_RUNS_DIR"]).glob("*/*/tracking.json")
    return record.parent, result


def seeded_cache(folder: Path) -> Path:
    """A cache folder of a test's own that starts with the embedded model's converted copy (hard links where
    the file system allows), so a test that reads every byte it writes does not pay the GGUF conversion."""
    from rlhf_exp.models import load_tokenizer

    cfg = compose_config(["model=tiny"])
    shared = Path(cfg.paths.cache_dir)
    load_tokenizer(cfg.model, str(shared))  # converts there once if it must

    def link_or_copy(source: str, target: str) -> None:
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)

    shutil.copytree(shared / "gguf", folder / "gguf", copy_function=link_or_copy)
    return folder

