"""The whole pipeline in one command: `python -m rlhf_exp experiment=tldr_pipeline`.

`pipeline.stages` lists the stages in order, by role (sft, rm, judge, dpo, grpo, eval), each as the
overrides that would launch it on its own; `run:<role>` in them names an earlier stage's checkpoint
(launch/lineage.py). Every stage is composed from `pipeline.common`, its own overrides, the command
line's (so `hardware=cpu` reaches all of them) and `pipeline.extra.<role>`, and runs in this process as a
child MLflow run of one parent run for the pipeline (experiment `rlhf_exp/pipeline`).

Each stage runs in `<runs_dir>/pipelines/<name>/<role>-<config hash>`: the hash covers the stage's whole
resolved config, its inputs' folders (which hold their own hashes) included. `pipeline.json` beside them
records what finished, so running the same pipeline again skips every stage FINISHED with the same config,
resumes one that was interrupted from its newest checkpoint (and the same MLflow run), and reruns the
stages whose config or inputs changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shlex
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, read_write

from rlhf_exp import vocabulary
from rlhf_exp.checkpoint import drop_training_state
from rlhf_exp.config import compose_config, flatten, resolved
from rlhf_exp.errors import ConfigError
from rlhf_exp.launch import run as one_run
from rlhf_exp.launch.jobs import LaunchContext, PipelineJob, git_commit
from rlhf_exp.launch.lineage import PREFIX, Source, lineage_tags, resolve_references, string_leaves
from rlhf_exp.redact import redact
from rlhf_exp.tracking.records import run_id_of

log = logging.getLogger(__name__)

STATE = "pipeline.json"
EXPERIMENT = "rlhf_exp/pipeline"
# keys that do not change what a stage computes: where things are written and how they are tracked
_NOT_HASHED = ("paths.", "tracking.", "stage.resume_from", "run_name", "hardware.num_threads", "pipeline.")


def config_hash(cfg: DictConfig) -> str:
    """sha256 of what the stage computes from: its resolved config without paths and tracking."""
    flat = flatten(redact(OmegaConf.to_container(cfg, resolve=True)))
    kept = {k: v for k, v in flat.items() if not k.startswith(_NOT_HASHED)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def command_line_overrides(context: LaunchContext) -> list[str]:
    """The overrides the pipeline was launched with, less those that pick the pipeline itself."""
    return [o for o in context.overrides if not o.lstrip("+~").startswith(("experiment=", "pipeline."))]


def last_of_each_key(overrides: list[str]) -> list[str]:
    """Hydra overrides with only the last of each key kept (the one that takes effect), in their order."""
    def key(override: str) -> str:
        return override.split("=", 1)[0].lstrip("+~")

    last = {key(o): i for i, o in enumerate(overrides)}
    return [o for i, o in enumerate(overrides) if last[key(o)] == i]


def stage_overrides(spec: DictConfig, role: str, user: list[str]) -> list[str]:
    extra = (spec.get("extra") or {}).get(role) or []
    return [*spec.get("common", []), *spec.stages[role], *user, *extra]


def stages_to_run(spec: DictConfig) -> list[str]:
    """The roles in order, up to `pipeline.until` (null: all of them)."""
    roles = list(spec.stages)
    until = spec.get("until")
    if until is None:
        return roles
    if until not in roles:
        raise ConfigError("pipeline.until", f"{until!r} is not a stage of this pipeline ({', '.join(roles)})")
    return roles[: roles.index(until) + 1]


def load_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE
    return json.loads(path.read_text()) if path.is_file() else {"stages": {}}


def save_state(folder: Path, state: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".{STATE}.tmp"
    staging.write_text(json.dumps(state, indent=2))
    staging.replace(folder / STATE)


def has_checkpoint(run_dir: Path) -> bool:
    from rlhf_exp.checkpoint import resume_point

    try:
        return resume_point(run_dir) != run_dir
    except ConfigError:
        return False


def summary_line(role: str, metrics: dict[str, float], minutes: float) -> str:
    """The stage's held-out figures in one line: those the vocabulary shows in the `summary`."""
    shown = ", ".join(f"{name}={value:.4g}" for name, value in vocabulary.shown("summary", metrics).items())
    return f"pipeline: {role} finished in {minutes:.1f} min" + (f": {shown}" if shown else "")


def plan_pipeline(spec: DictConfig, user: list[str]) -> dict[str, float]:
    """plan=true for a whole pipeline: every stage's memory plan, in order; nothing is trained, tracked or
    recorded. The inputs a stage takes from earlier ones (`run:<role>`) do not exist yet and are planned
    without them: a model.init_from as the model it starts from (the stages before it keep its shape), a
    reward model at reward.fn.path in the policy's shape; stage=eval's policies and judges hold no more
    than one policy at a time."""
    figures: dict[str, float] = {}
    for role in stages_to_run(spec):
        stage_cfg = compose_config([*stage_overrides(spec, role, user), "plan=true"])
        with read_write(stage_cfg):
            for key, text in string_leaves(OmegaConf.to_container(stage_cfg, resolve=False)):
                if text.startswith(PREFIX):
                    OmegaConf.update(stage_cfg, key, None, merge=False)
        print(f"pipeline {spec.name}, stage {role}:")
        figures.update({f"{role}/{name}": value for name, value in one_run.run(stage_cfg).items()})
    return figures


def run_pipeline(cfg: DictConfig, context: LaunchContext = LaunchContext()) -> dict[str, float]:
    """Run cfg.pipeline's stages in order (see the module docstring); returns the last stage's metrics.
    `context`: what the entrypoint read of Hydra (the command line the pipeline was launched with)."""
    spec = cfg.pipeline
    if not spec.get("stages"):
        raise ConfigError("pipeline.stages", "lists no stage")
    if cfg.get("plan"):
        return plan_pipeline(spec, command_line_overrides(context))
    folder = Path(OmegaConf.select(cfg, "paths.runs_dir")) / "pipelines" / spec.name
    state = load_state(folder)
    user = command_line_overrides(context)
    again = shlex.join(["python", "-m", "rlhf_exp", *context.overrides])  # what resumes it: the same command
    tracker = start_parent(cfg, spec, folder, state, user)
    roles: dict[str, Source] = {}
    metrics: dict[str, float] = {}
    status = "FAILED"
    try:
        for role in stages_to_run(spec):
            stage_cfg = resolved(compose_config(stage_overrides(spec, role, user)))
            inputs = lineage_tags(stage_cfg, resolve_references(stage_cfg, roles))
            digest = config_hash(stage_cfg)
            run_dir = folder / f"{role}-{digest[:10]}"
            record = state["stages"].get(role, {})
            if record.get("status") == "FINISHED" and record.get("hash") == digest and run_dir.is_dir():
                print(f"pipeline: {role} already finished with this config ({run_dir.name}): skipped")
                roles[role] = Source(run_dir, record.get("run_id"))
                metrics = record.get("metrics", {})
                continue
            if has_checkpoint(run_dir):
                with read_write(stage_cfg):
                    stage_cfg.stage.resume_from = str(run_dir)
                print(f"pipeline: {role} was interrupted: resuming from {run_dir}")
            elif record.get("status") == "RUNNING":
                print(f"pipeline: {role} was stopped before its first checkpoint: starting it again")
            job = None
            if tracker is not None:
                job = PipelineJob(tracker.run_id, tracker.uri, spec.name, role, digest, again, inputs)
            state["stages"][role] = {"hash": digest, "run_dir": str(run_dir), "status": "RUNNING"}
            save_state(folder, state)
            started = time.time()
            metrics = one_run.run(stage_cfg, run_dir=run_dir, job=job, context=context)
            run_id = run_id_of(run_dir)
            state["stages"][role].update(status="FINISHED", run_id=run_id, minutes=(time.time() - started) / 60,
                                         metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            save_state(folder, state)
            roles[role] = Source(run_dir, run_id)
            print(summary_line(role, metrics, (time.time() - started) / 60))
            if not spec.get("keep_training_state", True):
                freed = drop_training_state(run_dir)
                log.info("pipeline: %s's step checkpoints and optimizer state deleted (%.1f GB; "
                         "pipeline.keep_training_state=true keeps them)", role, freed / 1e9)
        status = "FINISHED"
    except BaseException as error:
        from rlhf_exp.stopping import RunStopped

        status = "KILLED" if isinstance(error, (KeyboardInterrupt, RunStopped)) else "FAILED"
        raise
    finally:
        if tracker is not None:
            close_parent(tracker, folder, state, status)
    return metrics


def start_parent(cfg: DictConfig, spec: DictConfig, folder: Path, state: dict, user: list[str]):
    """The pipeline's parent MLflow run (the one an earlier launch of this pipeline made, continued)."""
    if OmegaConf.select(cfg, "tracking.backend") != "mlflow":
        return None
    from rlhf_exp.tracking.mlflow_tracker import MlflowTracker

    tracking = OmegaConf.merge(cfg.tracking, {"experiment_name": EXPERIMENT})
    tracker = MlflowTracker(tracking, cfg.paths.root_dir)
    # what each stage runs with (its own overrides, the command line's and pipeline.extra's, the last of each key),
    # not the pipeline's definition alone: the quickstart's extra stage.max_steps=10 replaces the definition's 20
    common = list(spec.get("common", []))
    params = {f"stages.{role}": " ".join(o for o in last_of_each_key(stage_overrides(spec, role, user))
                                         if o not in common) for role in spec.stages}
    params["common"] = " ".join(common)
    tags = {"rlhf_exp.role": "pipeline", "pipeline": spec.name, "pipeline_dir": str(folder),
            "overrides": " ".join(redact(user)), "git_commit": git_commit()}
    tracker.start(f"pipeline {spec.name}", redact(params), tags, continue_run=state.get("parent_run_id"))
    state["parent_run_id"] = tracker.run_id
    save_state(folder, state)
    return tracker


HEADLINE = re.compile(r"^eval/[^/]+/(\w+_(lc_)?win_vs_[^/]+|kl_k1_seq|length|pair_accuracy)$")


def headline_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """What a person compares pipelines by, from stage=eval's metrics: each policy's (LC) win rates against the
    reference and the baseline, its KL to the reference and its length, each judge's held-out accuracy."""
    return {name: value for name, value in metrics.items()
            if HEADLINE.match(name) and not name.endswith(("_ci_low", "_ci_high"))}


def close_parent(tracker, folder: Path, state: dict, status: str) -> None:
    stages = state["stages"]
    tracker.set_tags({"stages_finished": sum(s.get("status") == "FINISHED" for s in stages.values()),
                      **{f"stage.{role}.run_id": s["run_id"] for role, s in stages.items() if s.get("run_id")}})
    headline: dict[str, float] = {}
    for role, record in stages.items():
        summary = Path(record["run_dir"]) / "eval" / "summary.md"
        if record.get("status") == "FINISHED" and summary.is_file():
            for path in sorted(summary.parent.iterdir()):
                tracker.log_artifact(str(path), f"eval/{role}")
            # the headline figures on the parent itself (its runs-table columns) and the table as an MLflow table
            headline.update(headline_metrics(record.get("metrics") or {}))
            tracker.log_metrics(headline, step=0)
            results = summary.parent / "results.json"
            if results.is_file():
                tracker.log_table(json.loads(results.read_text())["rows"], f"eval/{role}/summary_table.json")
    tracker.log_artifact(str(folder / STATE), "pipeline")
    tracker.finish(status)
    experiment = tracker.client.get_run(tracker.run_id).info.experiment_id
    from rlhf_exp.tracking.mlflow_tracker import save_runs_view, ui_address

    # the parent's row, and as columns what fits on a screen (the UI orders them by name): each policy's judge win
    # rate against the reference and the judge's own accuracy; the other headline figures are the parent's metrics too
    columns = [f"metrics.`{name}`" for name in sorted(headline) if name.endswith("/judge_win_vs_reference")
               or name == "eval/judge/pair_accuracy"]
    view = (save_runs_view(tracker, f"pipeline-{folder.name}", columns, f"attributes.run_id = '{tracker.run_id}'")
            if headline else None)
    local = "" if tracker.uri.startswith("http") else " (make ui first)"
    print(f"pipeline {status.lower()}: MLflow parent run {tracker.run_id}; to look at it{local}: "
          f"{ui_address(tracker.uri, f'/experiments/{experiment}/runs/{tracker.run_id}')}"
          + (f"\n  the policies side by side: {ui_address(tracker.uri, view)}" if view else ""))
