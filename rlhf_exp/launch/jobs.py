"""What a run knows of the job it belongs to: a sweep's job (`SweepJob`, found through the sweep's record)
or a pipeline's stage (`PipelineJob`, handed down by the pipeline), the overrides it was launched with, the
record names and tags the launchers share, the sweep objective, the code's commit. A leaf of the launch
wing: run, pipeline, sweep and report all read it, and it reads none of them."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from typing import Callable, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf

from rlhf_exp.config import PROJECT_ROOT
from rlhf_exp.redact import redact, uri_with_password
from rlhf_exp.tracking.records import PARENT_TAG

T = TypeVar("T")

SWEEP_RECORD = "sweep.json"  # in the sweep dir: the parent run its jobs log under
# the objective each child logs under one name, so every sweep's runs table has the same column
OBJECTIVE_METRIC = "objective"


def git_commit() -> str:
    """The checkout's commit; "unknown" for an installed wheel (whose site-packages may sit inside some other
    repository, a project's .venv, whose commit says nothing about this code)."""
    if not (PROJECT_ROOT / ".git").exists():
        return "unknown"
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def objective_of(cfg: DictConfig) -> tuple[str, str]:
    """(metric, "max" | "min") a sweep of this config optimizes: sweep.objective / sweep.direction, else
    the stage's own (its StageSpec)."""
    from rlhf_exp.stages import stage_spec
    from rlhf_exp.stages.spec import metric_direction

    return metric_direction(stage_spec(cfg.stage.name), OmegaConf.select(cfg, "sweep.objective"),
                            OmegaConf.select(cfg, "sweep.direction"))


def short_label(key: str) -> str:
    """stage.beta -> beta, model.num_layers -> num_layers; a group (dpo_loss) stays itself."""
    return key.lstrip("+~").rsplit(".", 1)[-1]


@dataclass
class SweepJob:
    """What a job of a sweep knows about it (from sweep.json and Hydra's job config)."""

    parent_run_id: str
    tracking_uri: str
    sweep_id: str
    number: int
    swept: dict[str, str]              # this job's values of the swept keys
    overrides: list[str] = field(default_factory=list)  # all its overrides, as typed

    def run_name(self, stage: str) -> str:
        values = " ".join(f"{short_label(k)}={v}" for k, v in self.swept.items())
        return f"{stage} {values}" if values else f"{stage} job {self.number}"

    def tags(self) -> dict[str, str]:
        return {PARENT_TAG: self.parent_run_id, "sweep_id": self.sweep_id, "sweep_job": str(self.number)}


@dataclass(frozen=True)
class LaunchContext:
    """What Hydra knows of this process's launch, read once at the entrypoint (`from_hydra`, the one read of
    Hydra's global state) and handed down; a run started from Python (a test, a notebook) has the empty one."""

    overrides: tuple[str, ...] = ()  # as typed, secrets and all: what resumes the launch
    output_dir: Path | None = None   # Hydra's folder for this job: the run folder
    hydra_files: Path | None = None  # Hydra's copy of the config and overrides (`<output_dir>/.hydra`)
    sweep_dir: Path | None = None    # set when the job is one of a sweep (`-m`)
    job_number: int = 0              # the job's number within the sweep

    @classmethod
    def from_hydra(cls) -> LaunchContext:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return cls()
        hydra_cfg = HydraConfig.get()
        output_dir = Path(hydra_cfg.runtime.output_dir)
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        return cls(overrides=tuple(hydra_cfg.overrides.task), output_dir=output_dir,
                   hydra_files=output_dir / hydra_cfg.output_subdir if hydra_cfg.output_subdir else None,
                   sweep_dir=Path(hydra_cfg.sweep.dir) if multirun else None,
                   job_number=int(hydra_cfg.job.num) if multirun else 0)

    @property
    def in_sweep(self) -> bool:
        return self.sweep_dir is not None

    def redacted_overrides(self) -> list[str]:
        """The overrides with their secrets redacted: for a run's `overrides` tag."""
        return redact(list(self.overrides))

    def sweep_job(self) -> SweepJob | None:
        """This process's sweep job, if it runs one of a sweep whose parent run exists."""
        record = self.sweep_dir / SWEEP_RECORD if self.sweep_dir is not None else None
        if record is None or not record.is_file():
            return None
        sweep = json.loads(record.read_text())
        overrides = self.redacted_overrides()  # they become tags and the run's name
        swept = {}
        for override in overrides:
            key, _, value = override.partition("=")
            if key.lstrip("+~") in sweep["swept"]:
                swept[key.lstrip("+~")] = value
        number = self.job_number + int(sweep.get("job_offset", 0))
        return SweepJob(sweep["parent_run_id"], uri_with_password(sweep["tracking_uri"]), sweep["sweep_id"], number,
                        swept, overrides)


@dataclass
class PipelineJob:
    """A stage of a pipeline, as `launch.run.run` sees it: whose child run it is and how it is named."""

    parent_run_id: str
    tracking_uri: str
    pipeline: str
    role: str
    config_hash: str
    resume_command: str
    inputs: dict[str, str] = field(default_factory=dict)  # lineage tags of the run: references resolved

    def run_name(self, stage: str) -> str:
        return self.role if self.role == stage else f"{self.role} ({stage})"

    def tags(self) -> dict[str, str]:
        return {PARENT_TAG: self.parent_run_id, "pipeline_run_id": self.parent_run_id,
                "pipeline": self.pipeline, "pipeline_role": self.role, "config_hash": self.config_hash,
                **self.inputs}


def best_with_ties(items: Sequence[T], value: Callable[[T], float], direction: str) -> tuple[T | None, list[T]]:
    """(the best of `items` by `value`, every item that ties with it). A tie goes to the first item (the
    lowest job number), and is never hidden: a sweep whose jobs all score 0.5625 has no best beta."""
    if not items:
        return None, []
    pick = max if direction == "max" else min
    best = pick(items, key=value)  # the first of the best: max / min keep the earliest of equal keys
    return best, [item for item in items if value(item) == value(best)]
