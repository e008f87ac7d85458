"""What a run knows of the job it belongs to: a sweep's job (`SweepJob`, found through the sweep's record)
or a pipeline's stage (`PipelineJob`, handed down by the pipeline), the overrides it was launched with, the
record names and tags the launchers share, the sweep objective, the code's commit. A leaf of the launch
wing: run, pipeline, sweep and report all read it, and it reads none of them."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlhf_exp.config import PROJECT_ROOT
from rlhf_exp.redact import redact, uri_with_password
from rlhf_exp.tracking.records import PARENT_TAG

SWEEP_RECORD = "sweep.json"  # in the sweep dir: the parent run its jobs log under
# the objective each child logs under one name, so every sweep's runs table has the same column
OBJECTIVE_METRIC = "objective"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def typed_overrides() -> list[str]:
    """The overrides this process was launched with, as typed (Hydra's), secrets and all: what resumes it."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def job_overrides() -> list[str]:
    """typed_overrides() with their secrets redacted: for a run's `overrides` tag."""
    return redact(typed_overrides())


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


def current_job() -> SweepJob | None:
    """This process's sweep job, if it runs one of a sweep whose parent run exists."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    record = Path(hydra_cfg.sweep.dir) / SWEEP_RECORD
    if not record.is_file():
        return None
    sweep = json.loads(record.read_text())
    overrides = job_overrides()  # they become tags and the run's name
    swept = {}
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+~") in sweep["swept"]:
            swept[key.lstrip("+~")] = value
    number = int(hydra_cfg.job.num) + int(sweep.get("job_offset", 0))
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
