"""Sweeps as experiments: `python -m rlhf_exp -m stage=dpo stage.beta=0.05,0.1,0.3` is one parent MLflow run
with a child per job.

`SweepCallback` (conf/hydra/default.yaml's hydra.callbacks) runs in the process that launches the jobs:
on multirun start it creates the parent run (the search space, sweeper, launcher and objective as
params) and writes `<sweep dir>/sweep.json`; each job, wherever the launcher runs it (this process,
a joblib worker, a SLURM node), finds that file through Hydra's sweep dir and logs as the parent's
child (`mlflow.parentRunId`), named by its swept values ("dpo beta=0.1"). On multirun end the
callback counts the children, tags the best by the objective, logs the comparison report
(`rlhf_exp.report`) and closes the parent: FAILED only if every job failed.

A job that fails is a FAILED child and the sweep goes on (`job_failed`); a job that failed before its
run existed (a bad value in the search space) still gets a FAILED child saying why.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from rlhf_exp.launch import optuna_sweep
from rlhf_exp.launch.jobs import (OBJECTIVE_METRIC, SWEEP_RECORD, LaunchContext, best_with_ties, git_commit, objective_of,
                                  short_label)
from rlhf_exp.launch.report import REPORT_TAG, write_report
from rlhf_exp.redact import redact, redact_text
from rlhf_exp.tracking.mlflow_tracker import UI_TRAINING_SIDE, save_runs_view
from rlhf_exp.tracking.records import PARENT_TAG

log = logging.getLogger(__name__)

def swept_space(hydra_cfg: DictConfig) -> dict[str, str]:
    """{key: its search space as typed} for every key the sweep varies: sweep overrides on the command
    line (stage.beta=0.05,0.1,0.3) and the sweeper's params (a preset's hydra.sweeper.params)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    space: dict[str, str] = {}
    for key, value in (OmegaConf.select(hydra_cfg, "sweeper.params") or {}).items():
        space[key.lstrip("+~")] = str(value)
    parsed = OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task))
    for override in parsed:
        if override.is_sweep_override():
            space[override.key_or_group] = override.input_line.split("=", 1)[1]
    return space


def job_failed(cfg: DictConfig, context: LaunchContext, error: BaseException) -> None:
    """A sweep job ended in `error`: give it a FAILED child if it has none yet (it failed before its run
    was created, e.g. a bad value in the search space), so the parent shows every job."""
    job = context.sweep_job()
    if job is None:
        return
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(job.tracking_uri)
    parent = client.get_run(job.parent_run_id)
    found = client.search_runs([parent.info.experiment_id], max_results=1, filter_string=(
        f"tags.sweep_id = '{job.sweep_id}' and tags.sweep_job = '{job.number}'"))
    if found:
        return
    stage = str(OmegaConf.select(cfg, "stage.name", default="") or "job")
    tags = {**job.tags(), "overrides": " ".join(job.overrides), "error": redact_text(str(error))[:5000]}
    run = client.create_run(parent.info.experiment_id, run_name=job.run_name(stage), tags=tags)
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in job.swept.items()],
                     tags=[RunTag("mlflow.note.content", f"failed before training: {tags['error']}")])
    client.set_terminated(run.info.run_id, status="FAILED")


@dataclass
class SweepSummary:
    parent_run_id: str
    finished: int
    failed: int
    other: int
    best_run_id: str | None
    best_value: float | None
    report_dir: Path | None

    @property
    def status(self) -> str:
        return "FAILED" if self.finished == 0 else "FINISHED"


# the sweep this process launched and has not closed (cli closes it if the sweep dies: Ctrl-C, SIGTERM)
_OPEN: dict[str, Any] = {}
LAST_SUMMARY: list[SweepSummary] = []


class SweepCallback(Callback):
    """Hydra callback: the parent MLflow run of a multirun (see the module docstring)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if OmegaConf.select(config, "tracking.backend") != "mlflow":
            return
        from rlhf_exp.tracking.mlflow_tracker import MlflowTracker, tracking_uri

        hydra_cfg = config.hydra
        sweep_dir = Path(hydra_cfg.sweep.dir)
        space = redact(swept_space(hydra_cfg))
        objective, direction = objective_of(config)
        stage = config.stage.name
        server = start_tracking_server(config, sweep_dir)
        tracking = config.tracking if server is None else OmegaConf.merge(config.tracking, {"tracking_uri": server.uri})
        tracker = MlflowTracker(tracking, config.paths.root_dir)
        keys = ", ".join(short_label(k) for k in space) or "no swept keys"
        params = {**{f"space.{key}": value for key, value in space.items()},
                  "sweeper": str(OmegaConf.select(hydra_cfg, "sweeper._target_")).rsplit(".", 1)[-1],
                  "launcher": str(OmegaConf.select(hydra_cfg, "launcher._target_")).rsplit(".", 1)[-1],
                  "objective": objective, "direction": direction}
        tags = {"rlhf_exp.role": "sweep", "sweep_id": sweep_dir.name, "sweep_dir": str(sweep_dir), "stage": stage,
                "overrides": " ".join(redact(list(hydra_cfg.overrides.task))), "git_commit": git_commit(),
                REPORT_TAG: json.dumps({name: OmegaConf.to_container(OmegaConf.select(
                    config, f"sweep.{name}", default=OmegaConf.create([]))) for name in ("report_metrics", "tradeoffs")})}
        continued, job_offset = None, 0
        if optuna_sweep.is_optuna(config):
            study = redact(optuna_sweep.study_record(config))
            tags.update(study)
            if int(study["optuna.trials_before"]):  # a continued study goes on under the parent it had
                continued, job_offset = continue_parent(tracker, study)
                if continued is not None:
                    tags["resumed_from"] = str(sweep_dir)
        tracker.start(f"{stage} sweep: {keys}", params, tags, continue_run=continued)
        view = share_ui_view(tracker, sweep_dir.name, [k for k in space if is_param(config, k)], objective, direction, stage,
                             base_url=tracker.uri if tracker.uri.startswith("http") and server is None else "")
        if view:
            tracker.set_tags({"ui_view": view})
        sweep_dir.mkdir(parents=True, exist_ok=True)
        record = {"parent_run_id": tracker.run_id, "tracking_uri": redact_text(tracker.uri), "sweep_id": sweep_dir.name,
                  "swept": list(space), "objective": objective, "direction": direction, "job_offset": job_offset}
        if server is not None:  # where the runs are once the sweep's own server has stopped
            record["store_uri"] = redact_text(tracking_uri(config.tracking, config.paths.root_dir))
        (sweep_dir / SWEEP_RECORD).write_text(json.dumps(record, indent=2))
        _OPEN.update(tracker=tracker, sweep_dir=sweep_dir, objective=objective, direction=direction,
                     started=time.time(), server=server, view=view)
        log.info("sweep %s: parent MLflow run %s (objective %s, %s)", sweep_dir.name, tracker.run_id,
                 objective, direction)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if _OPEN:
            LAST_SUMMARY[:] = [close_sweep()]


def continue_parent(tracker, study: dict[str, str]) -> tuple[str | None, int]:
    """The parent run of an earlier search of this Optuna study (the newest), to continue instead of
    starting a second one, and how many children it has (the continued jobs number on from there).
    Its children left RUNNING were jobs of a search that was killed: closed KILLED."""
    client = tracker.client
    filters = " and ".join(["tags.`rlhf_exp.role` = 'sweep'"] + [
        f"tags.`{key}` = '{study[key]}'" for key in ("optuna.study", "optuna.storage")])
    found = client.search_runs([tracker.experiment_id()], filter_string=filters, max_results=1,
                               order_by=["attributes.start_time DESC"])
    if not found:
        return None, 0
    parent = found[0].info.run_id
    children = client.search_runs([found[0].info.experiment_id], max_results=10_000,
                                  filter_string=f"tags.`{PARENT_TAG}` = '{parent}'")
    for child in children:
        if child.info.status == "RUNNING":
            client.set_tag(child.info.run_id, "killed_note", "its search was killed; the study continued")
            client.set_terminated(child.info.run_id, status="KILLED")
    log.info("optuna: continuing the study's parent MLflow run %s (%d jobs so far)", parent, len(children))
    return parent, len(children)


def is_param(config: DictConfig, key: str) -> bool:
    """Whether a swept key is a config value (a param of each job), not a config group (dpo_loss=ipo)."""
    value = OmegaConf.select(config, key, default=None)
    return value is not None and not OmegaConf.is_config(value)


def share_ui_view(tracker, sweep_id: str, param_keys: list[str], objective: str, direction: str, stage: str,
                  base_url: str = "") -> str | None:
    """An MLflow UI view of this sweep, saved in its experiment as MLflow's own shared views are (the
    `mlflow.sharedViewState.<key>` tag): the parent and its jobs (the runs tagged with the sweep's id), best
    objective first, with the swept params, the objective and the stage's report metrics as columns.
    Returns the view's address."""
    from rlhf_exp.stages import stage_spec

    metrics = dict.fromkeys([OBJECTIVE_METRIC, objective, *stage_spec(stage).report_metrics])
    route = save_runs_view(tracker, sweep_id, [f"params.`{k}`" for k in param_keys] + [f"metrics.`{m}`" for m in metrics],
                           f"tags.sweep_id = '{sweep_id}'", (f"metrics.`{OBJECTIVE_METRIC}`", direction == "min"))
    return f"{base_url}/#{route}&{UI_TRAINING_SIDE}" if route else None


def start_tracking_server(config: DictConfig, sweep_dir: Path):
    """An `mlflow server` over the configured SQLite file for this sweep (see sweep.server), or None.
    Its jobs find its URI in sweep.json; it stops when the sweep closes."""
    from rlhf_exp.tracking.mlflow_tracker import artifact_location, ready_client, tracking_uri
    from rlhf_exp.tracking.server import MlflowServer

    mode = OmegaConf.select(config, "sweep.server", default="auto")
    uri = tracking_uri(config.tracking, config.paths.root_dir)
    launcher = str(OmegaConf.select(config, "hydra.launcher._target_"))
    parallel = not launcher.endswith("BasicLauncher")
    if not uri.startswith("sqlite:"):
        return None
    remote = launcher.endswith("SlurmLauncher") or (  # jobs on other nodes
        launcher.endswith("RayLauncher") and OmegaConf.select(config, "hydra.launcher.ray.init.address") is not None)
    if remote:  # a server on this host's 127.0.0.1 is out of their reach; a shared file system may do
        log.warning("hydra/launcher: %s runs jobs on other machines, which write %s directly (a file on a shared "
                    "file system, one writer at a time): name a tracking server they reach instead "
                    "(MLFLOW_TRACKING_URI=http://<host>:5000)", launcher.rsplit(".", 1)[-1], uri)
        return None
    if mode == "never" or (mode == "auto" and not parallel):
        return None
    ready_client(uri)  # create / migrate the file once, before the server and the jobs touch it
    sweep_dir.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(uri, artifact_location(config.tracking, uri), log_path=sweep_dir / "mlflow_server.log")
    log.info("sweep: jobs log through an mlflow server on %s over %s (sweep.server=%s)", server.uri, uri, mode)
    return server


def close_sweep(status: str | None = None) -> SweepSummary:
    """Count the open sweep's children, tag the best, log the report and close the parent (`status`: as
    the children say, or KILLED / FAILED when the sweep itself was stopped)."""
    tracker, sweep_dir = _OPEN.pop("tracker"), _OPEN.pop("sweep_dir")
    objective, direction, server = _OPEN.pop("objective"), _OPEN.pop("direction"), _OPEN.pop("server", None)
    view = _OPEN.pop("view", None)
    _OPEN.clear()
    try:
        return _close(tracker, sweep_dir, objective, direction, status, view)
    finally:
        if server is not None:
            server.stop()


def _close(tracker, sweep_dir: Path, objective: str, direction: str, status: str | None,
           view: str | None) -> SweepSummary:
    client, parent_id = tracker.client, tracker.run_id
    children = client.search_runs([client.get_run(parent_id).info.experiment_id], max_results=10_000,
                                  filter_string=f"tags.{PARENT_TAG} = '{parent_id}'")
    children.sort(key=lambda r: int(r.data.tags.get("sweep_job", 0)))  # ties go to the first job, as in the report
    counts = {s: sum(r.info.status == s for r in children) for s in ("FINISHED", "FAILED")}
    scored = [r for r in children if r.info.status == "FINISHED" and objective in r.data.metrics]
    best, tied = best_with_ties(scored, lambda r: r.data.metrics[objective], direction)
    summary = SweepSummary(parent_id, counts["FINISHED"], counts["FAILED"],
                           len(children) - counts["FINISHED"] - counts["FAILED"],
                           best.info.run_id if best else None, best.data.metrics[objective] if best else None, None)
    tags = {"jobs": len(children), "jobs_finished": summary.finished, "jobs_failed": summary.failed}
    if best is not None:
        tags.update(best_run_id=best.info.run_id, best_run_name=best.info.run_name, best_tied_jobs=len(tied))
        tracker.log_metrics({f"best/{objective}": summary.best_value}, step=0)
    tracker.log_metrics({"jobs_finished": summary.finished, "jobs_failed": summary.failed}, step=0)
    tracker.set_tags(tags)
    if (sweep_dir / "multirun.yaml").is_file():
        tracker.log_artifact(str(sweep_dir / "multirun.yaml"), "config")
    if children:
        try:
            summary.report_dir = write_report(client, parent_id, sweep_dir / "report")
            for path in sorted(summary.report_dir.iterdir()):
                tracker.log_artifact(str(path), "report")
        except Exception:  # a sweep's runs are all in MLflow; the report can be made again
            log.exception("could not build the sweep report (python -m rlhf_exp.report %s)", parent_id)
    tracker.finish(status or summary.status)
    where = f"; report: {summary.report_dir}/report.md" if summary.report_dir else ""
    if len(tied) > 1:
        best_note = (f", best {summary.best_value:.4g} TIED by {len(tied)} jobs ({', '.join(r.info.run_name for r in tied)}:"
                     f" no job is better; the first is tagged best)")
    else:
        best_note = f", best {summary.best_value:.4g} ({best.info.run_name})" if best else ""
    if view:  # a whole address: the sweep's own or the tracking server's, else make ui's
        view = (f"\n  in the MLflow UI: {view}" if view.startswith("http") else
                f"\n  in the MLflow UI (make ui first): http://127.0.0.1:5000{view}")
    print(f"sweep {sweep_dir.name}: {summary.finished} finished, {summary.failed} failed{best_note}; "
          f"MLflow parent run {parent_id}{where}{view}")
    return summary


def close_if_open(status: str) -> None:
    """The sweep stopped before Hydra's multirun end (Ctrl-C, SIGTERM, a launcher error): close its parent."""
    if _OPEN:
        try:
            close_sweep(status)
        except Exception:
            log.exception("could not close the sweep's parent run")
