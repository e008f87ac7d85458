"""`run(cfg)`: one run of one stage, tracked. Testable without Hydra's `@main`; a pipeline (launch/pipeline.py)
calls it once a stage.

Order matters: the config is checked before any data or weights are loaded, and the
tracker run is closed in `finally` (FINISHED, FAILED or KILLED), so a failed run never
blocks the next run in the same process (sweeps, tests).
"""

from __future__ import annotations

import json
import logging
import shlex
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from omegaconf import DictConfig, OmegaConf

import rlhf_exp
from rlhf_exp import distributed, run_lock, stopping
from rlhf_exp.checkpoint import resume_point
from rlhf_exp.checkpoint_layout import CHECKPOINTS
from rlhf_exp.data.formats import data_label, data_name
from rlhf_exp.errors import ConfigError
from rlhf_exp.config import AUTO_CHOICE, check_inputs, check_resumable, config_group_options, flatten, resolved, validate
from rlhf_exp.redact import redact, redact_text, redact_yaml_files
from rlhf_exp.runtime import choose_precision
from rlhf_exp.launch import jobs
from rlhf_exp.launch.lineage import checkpoint_model_name, lineage_tags, resolve_references
from rlhf_exp.planner import Plan
from rlhf_exp.stages import stage_spec
from rlhf_exp.stages.spec import StageSpec
from rlhf_exp.tracking import Tracker, make_tracker
from rlhf_exp.tracking.records import RUN_RECORD, run_record

log = logging.getLogger(__name__)

def run_dir_for(cfg: DictConfig, context: jobs.LaunchContext = jobs.LaunchContext()) -> Path:
    """Hydra's output folder when run by Hydra (`python -m rlhf_exp` points it at the resumed run's folder,
    __main__.py); otherwise the folder of the run stage.resume_from continues, or a fresh one under paths.runs_dir."""
    from rlhf_exp.checkpoint_layout import run_folder_of

    resumed = run_folder_of(cfg.stage.resume_from) if cfg.stage.get("resume_from") else None
    if context.output_dir is not None:
        folder = context.output_dir
    elif resumed is not None:
        folder = resumed
    else:
        from rlhf_exp.config import run_id

        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        folder = Path(cfg.paths.runs_dir) / cfg.stage.name / f"{stamp}_{run_id()}_{time.monotonic_ns() % 10**6}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass(frozen=True)
class Launch:
    """What `run` settles before the stage's trainer is built, handed down once."""

    cfg: DictConfig             # resolved and checked
    spec: StageSpec             # the stage's declaration (rlhf_exp/stages/<name>.py), looked up once
    run_dir: Path
    job: jobs.SweepJob | jobs.PipelineJob | None  # whose child run this is
    lineage_tags: dict[str, str]
    precision_reason: str
    plan: Plan | None           # the memory plan at the configured caps; None: the model's shape is unknown
    context: jobs.LaunchContext  # what Hydra knew of the launch (overrides, folders), read once


def memory_plan(cfg: DictConfig) -> Plan | None:
    """The run's memory plan, made once: checked before any weights load, reported beside the measured peak
    at the end, and quoted when an allocation fails. None where the model's shape is unknown (plan=true:
    an error)."""
    from rlhf_exp.errors import UserInputError
    from rlhf_exp.planner import plan_run

    checked = cfg.get("plan") or cfg.hardware.get("check_memory_plan", True)
    try:
        return plan_run(cfg)
    except UserInputError:
        if cfg.get("plan"):
            raise
        if checked:
            log.warning("no memory plan for this run (the model's shape is unknown); launching without the check")
        return None
    except Exception:  # unchecked, the plan is only a report: a gap in it must not stop the run
        if checked:
            raise
        log.exception("memory plan failed")
        return None


def check_memory(cfg: DictConfig, spec: StageSpec, plan: Plan | None) -> dict[str, float] | None:
    """plan=true: print the memory plan and return its figures (nothing is run). Otherwise stop
    a run the plan says will not fit, before any weights are loaded."""
    from rlhf_exp.errors import UserInputError

    if plan is None or (not cfg.get("plan") and not cfg.hardware.get("check_memory_plan", True)):
        return None
    tips = "\n".join(f"  - {tip}" for tip in plan.advice(cfg, spec.micro_batch))
    if cfg.get("plan"):
        print(f"memory plan: stage={cfg.stage.name} model={cfg.model.name} hardware={cfg.hardware.name}\n{plan.table()}"
              + (f"\nTry:\n{tips}" if plan.fits is False else ""))
        return {"plan/total_gib": plan.total_gib, "plan/tensors_gib": plan.tensors_gib,
                "plan/fits": float(plan.fits) if plan.fits is not None else float("nan")}
    if plan.fits is False:
        raise UserInputError(f"this run is not expected to fit in {plan.available_gib:.1f} GiB "
                             f"(hardware={cfg.hardware.name}):\n{plan.table()}\nTry:\n{tips}\n"
                             "(hardware.check_memory_plan=false launches anyway)")
    return None


@contextmanager
def out_of_memory_reported(cfg: DictConfig, spec: StageSpec, plan: Plan | None) -> Iterator[None]:
    """An allocation that fails (torch's CPU allocator under a cgroup or `ulimit -v` limit, CUDA) is one line
    with the memory plan's figures and its cheapest levers, not an allocator traceback."""
    from rlhf_exp.errors import OutOfMemory, is_out_of_memory

    try:
        yield
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        figures = "no memory plan for this run (the model's shape is unknown); try plan=true"
        if plan is not None:
            try:
                where = f"{plan.device}: {plan.available_from}" if plan.available_from else plan.device
                tips = plan.advice(cfg, spec.micro_batch)[:2]
                figures = (f"the memory plan expected {plan.total_gib:.2f} GiB of {plan.available_gib or 0:.2f} "
                           f"GiB available ({where}); try {' or '.join(tips)}")
            except Exception:  # noqa: BLE001 - a plan is a help here, never a second failure
                pass
        raise OutOfMemory(str(cfg.hardware.device), error, figures) from error


def plan_the_data(cfg: DictConfig, trainer) -> None:
    """The memory plan again once the data has loaded, at the longest prompt (and, for a stage that reads its
    responses from the data, the longest response) the data holds rather than the configured caps: the figure
    the run will meet. Said in the log; a run that will not fit is refused, or warned about loudly under
    hardware.check_memory_plan=false."""
    from rlhf_exp.errors import UserInputError
    from rlhf_exp.planner import plan_run
    from rlhf_exp.stages.spec import sequence_tokens

    longest = trainer.longest_sequences() if distributed.is_main() else None
    if longest is None:
        return
    prompt, response = longest
    cap_prompt, cap_response = sequence_tokens(cfg)
    lengths = {"max_prompt_tokens": max(1, min(prompt, cap_prompt))}
    if response is not None:
        lengths["max_response_tokens"] = max(1, min(response, cap_response) - 1)
    try:
        plan = plan_run(OmegaConf.merge(cfg, {"data": lengths}))
    except UserInputError:
        return  # no plan for this model's shape (check_memory said so already)
    what = f"the data's longest prompt ({prompt} tokens; data.max_prompt_tokens={cap_prompt})" + (
        f" and response ({response} tokens)" if response is not None else "")
    available = f" of {plan.available_gib:.2f} GiB" if plan.available_gib is not None else ""
    log.info("memory plan at %s: %.2f GiB%s", what, plan.total_gib, available)
    if plan.fits is not False:
        return
    message = (f"at {what} this run is expected to need {plan.total_gib:.2f} GiB{available} "
               f"(hardware={cfg.hardware.name}):\n{plan.table()}")
    if cfg.hardware.get("check_memory_plan", True):
        raise UserInputError(message + "\n(hardware.check_memory_plan=false launches anyway)")
    log.warning("%s\nlaunching anyway (hardware.check_memory_plan=false): expect to run out of memory", message)


def check_distributed(cfg: DictConfig, spec: StageSpec | None = None) -> None:
    """Under torchrun: what the stage says it runs under (its StageSpec), then what any mode needs."""

    world = distributed.world_size()
    if world == 1:
        return
    spec = spec or stage_spec(cfg.stage.name)
    parallel = cfg.get("parallel") or {}
    if not spec.parallel:
        several = [name for name in config_group_options("stage") if stage_spec(name).parallel]
        raise ConfigError("stage", f"stage={spec.name} runs in one process for now; data parallelism (torchrun) "
                          f"covers {', '.join(several)}")
    if parallel.get("name") not in spec.parallel:
        why = f" {spec.parallel_note}" if spec.parallel_note else ""
        raise ConfigError("parallel", f"stage={spec.name}{why}: use parallel={' or '.join(spec.parallel)} "
                          f"(got parallel={parallel.get('name')})")
    zero_stage = distributed.deepspeed_stage(parallel)
    if zero_stage:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("parallel", f"parallel={parallel.name} needs DeepSpeed: pip install -e '.[deepspeed]' "
                              "(or use PyTorch's own parallel=zero2 / fsdp)")
    if distributed.shards_weights(parallel) and (cfg.hardware.lora.enabled or cfg.hardware.load_in_4bit):
        raise ConfigError("parallel", f"parallel={parallel.name} shards full weights; with LoRA / 4-bit the "
                          "trainable part is small: use parallel=ddp (or zero1)")
    if (parallel.get("shard_optimizer") or zero_stage) and cfg.hardware.optimizer != "adamw":
        raise ConfigError("hardware.optimizer", f"parallel={parallel.name} shards torch's AdamW; "
                          f"{cfg.hardware.optimizer} (bitsandbytes) is not shardable: use hardware.optimizer=adamw")
    for key in dict.fromkeys(("batch_size", spec.batch_key)):
        if cfg.stage[key] % world:
            raise ConfigError(f"stage.{key}", f"must divide evenly over {world} processes (got {cfg.stage[key]})")


def redact_hydra_files(context: jobs.LaunchContext) -> None:
    """Hydra wrote `.hydra/` (and a sweep's multirun.yaml) before the run started: hide secrets there too."""
    if context.hydra_files is not None:
        redact_yaml_files(context.hydra_files)
    if context.sweep_dir is not None:
        redact_yaml_files(context.sweep_dir)


def resume_command(checkpoint: Path | str, overrides: Sequence[str]) -> str:
    """The command line of this run with stage.resume_from=<checkpoint> (Hydra's overrides, as typed)."""
    kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != "stage.resume_from"]
    return shlex.join(["python", "-m", "rlhf_exp", *kept, f"stage.resume_from={checkpoint}"])


def resumed_run(cfg: DictConfig, tracker: Tracker) -> str | None:
    """The tracker run of the folder being resumed (<run>/checkpoints/<name> -> <run>/tracking.json), if it
    is in this tracker."""
    resumed = cfg.stage.get("resume_from")
    record = Path(resumed).parent.parent / RUN_RECORD if resumed else None
    if record is None or not record.is_file():
        return None
    earlier = json.loads(record.read_text())
    return earlier["run_id"] if earlier.get("tracking_uri") in recorded_forms(tracker.uri) else None


def recorded_forms(uri: str | None) -> tuple[str | None, ...]:
    """A tracking URI as run records hold it: its password redacted (records written before: as it was)."""
    return (uri, redact_text(uri)) if uri else (uri,)


def record_run(tracker: Tracker, run_dir: Path, earlier: str | None) -> None:
    """Write which tracker run this folder is (RUN_RECORD). A run resumed into a new tracker run
    (tracking.continue_on_resume=false) closes the earlier one if a SIGKILL (an OOM kill, a power cut)
    left it RUNNING."""
    if tracker.run_id is None:
        return
    (run_dir / RUN_RECORD).write_text(json.dumps({"run_id": tracker.run_id, "tracking_uri": redact_text(tracker.uri)}))
    if earlier is None or earlier == tracker.run_id:
        return
    if tracker.close_abandoned(earlier, f"its process died without closing it (SIGKILL, an OOM kill); "
                                        f"marked KILLED when resumed by run {tracker.run_id}"):
        log.warning("run %s was left RUNNING by a process that died: marked KILLED", earlier)


def close_runs_of_dead_processes(cfg: DictConfig, tracker: Tracker) -> None:
    """A run SIGKILLed before its first checkpoint is never resumed, so nothing else would close its tracker
    run: at each start, the project's run folders whose lock names a process that died holding it have their
    tracker run, if still RUNNING, closed KILLED."""
    if tracker.uri is None:
        return
    runs, multiruns = Path(cfg.paths.runs_dir), Path(cfg.paths.root_dir) / "multiruns"
    patterns = [(runs, "*/*"), (runs, "pipelines/*/*"), (multiruns, "*/*")]  # a stage's, a pipeline's, a sweep job's
    folders = [lock.parent for root, pattern in patterns if root.is_dir()
               for lock in root.glob(f"{pattern}/{run_lock.LOCK_FILE}")]
    for folder, holder in run_lock.take_stale_locks(folders):
        record = run_record(folder)
        if record.get("tracking_uri") not in recorded_forms(tracker.uri):
            continue
        note = (f"its process ({holder.get('pid', '?')} on {holder.get('host', '?')}) died without closing it "
                "(SIGKILL, an OOM kill); marked KILLED at the next start in this project")
        if tracker.close_abandoned(record["run_id"], note):
            log.warning("run %s (%s) was left RUNNING by a process that died: marked KILLED", record["run_id"], folder)


def resolve_run_references(cfg: DictConfig) -> dict[str, str]:
    """Config values `run:<MLflow run id>[@best|@last]` become that run's checkpoint folder (a pipeline
    resolves `run:<role>` itself, before this); returns lineage tags (`init_from`, `init_from_run_id`)."""
    resolved_refs = resolve_references(cfg, roles={}, tracking=cfg.tracking, root_dir=cfg.paths.root_dir)
    return lineage_tags(cfg, resolved_refs)


def name_the_loaded_model(cfg: DictConfig) -> None:
    """model.name (the run's `model` tag, its name, the plan's title) says what model.init_from holds, not the
    model group's default (a DPO run from a tiny SFT checkpoint was logged as smollm2_135m)."""
    init_from = cfg.model.get("init_from")
    name = checkpoint_model_name(init_from) if init_from else None
    if name:
        cfg.model.name = name


def run(cfg: DictConfig, run_dir: Path | None = None, job=None,
        context: jobs.LaunchContext = jobs.LaunchContext()) -> dict[str, float]:
    """Run the stage `cfg.stage` names; returns its final metrics (plan=true: the memory plan's). `run_dir`
    and `job` (whose child run this is: a `jobs.PipelineJob`; a sweep's job is found from `context`) are a
    pipeline's; `context` is what the entrypoint read of Hydra (none for a run started from Python)."""
    requested_precision = str(cfg.hardware.precision)
    cfg = resolved(cfg)
    inputs = resolve_run_references(cfg)  # lineage tags: where model.init_from and other run: references led
    name_the_loaded_model(cfg)
    validate(cfg)
    if not cfg.get("plan"):  # a memory plan for a GPU profile is made anywhere
        check_inputs(cfg)
    precision_reason = choose_precision(requested_precision, str(cfg.hardware.device))[1]
    log.info("precision: %s (%s)", cfg.hardware.precision, precision_reason)
    for choice in AUTO_CHOICE:
        log.info(choice)
    spec = stage_spec(cfg.stage.name)
    if cfg.stage.get("resume_from"):
        cfg.stage.resume_from = str(resume_point(Path(cfg.stage.resume_from)))
        check_resumable(Path(cfg.stage.resume_from), cfg, spec.resume_fixed)
    OmegaConf.set_readonly(cfg, True)  # settled: from here on the config is read, never edited
    plan = memory_plan(cfg)
    planned = check_memory(cfg, spec, plan)
    if planned is not None:
        return planned
    distributed.init(str(cfg.hardware.device))
    check_distributed(cfg, spec)
    # torchrun: rank 0 picks the run folder (its clock and id) and the others use it; only it tracks
    if run_dir is None:
        run_dir = Path(distributed.broadcast_object(str(run_dir_for(cfg, context)) if distributed.is_main() else None))
    run_dir.mkdir(parents=True, exist_ok=True)
    if job is None:
        job = context.sweep_job() if cfg.tracking.backend == "mlflow" else None
    launch = Launch(cfg, spec, run_dir, job, inputs, precision_reason, plan, context)
    with run_lock.all_locked(folders_written(cfg, run_dir) if distributed.is_main() else []):
        return tracked_run(launch)


def folders_written(cfg: DictConfig, run_dir: Path) -> list[Path]:
    """The run folders this run writes into: its own and, when resuming, the one it continues (whose MLflow
    run and outbox it takes over), so that a second process on either is refused."""
    resumed = Path(cfg.stage.resume_from) if cfg.stage.get("resume_from") else None
    continued = resumed.parent.parent if resumed is not None and resumed.parent.name == CHECKPOINTS else None
    return list(dict.fromkeys([*([continued] if continued is not None else []), run_dir]))  # usually one folder


def tracked_run(launch: Launch) -> dict[str, float]:
    """The checked run in its folder: config written, the stage's data and weights loaded, tracker run opened
    (or continued), the trainer fitted, the tracker run closed FINISHED, FAILED or KILLED whatever happens.
    A stop signal from the first load on is seen at the next step boundary (or batch of a pass), never fatal."""
    with stopping.stop_at_step_boundary():
        return prepare_and_fit(launch)


def description(cfg: DictConfig, overrides: str) -> str:
    """The run's MLflow description when the config gives none: what ran, on what, and the command."""
    started = f"from `{cfg.model.init_from}`" if cfg.model.get("init_from") else f"from {cfg.model.name}"
    return (f"**{cfg.stage.name}** {started} on **{data_label(cfg.data)}** ({cfg.hardware.name}, "
            f"{cfg.hardware.precision}).\n\n`python -m rlhf_exp {overrides}`")


def log_final_model(cfg: DictConfig, tracker: Tracker, run_dir: Path, step: int, name: str) -> None:
    """The final checkpoint, exported as rlhf_exp.export writes it, as the run's MLflow model (tracking.log_model;
    tracking.register_as registers it). A stage without one (stage=eval) logs none; one that cannot be exported
    (LoRA adapters kept unmerged) is said, and the run still finishes."""
    import tempfile

    from rlhf_exp.checkpoint_layout import FINAL, checkpoints_of
    from rlhf_exp.export import export

    final = checkpoints_of(run_dir) / FINAL
    if not final.is_dir():
        return
    with tempfile.TemporaryDirectory(prefix="export-", dir=run_dir) as scratch:
        try:
            folder = export(final, Path(scratch) / "export")
        except ConfigError as error:
            log.warning("tracking.log_model: the final model is not logged: %s", error)
            return
        # named as its run is (a pipeline's "judge (rm)" and "rm" are told apart; a sweep job's by its values)
        tracker.log_model(folder, name, step, cfg.tracking.get("register_as"))


def prepare_and_fit(launch: Launch) -> dict[str, float]:
    cfg, run_dir, job = launch.cfg, launch.run_dir, launch.job
    written = redact(OmegaConf.to_container(cfg, resolve=True))  # the config as stored: no secrets
    if distributed.is_main():
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(written)))
        redact_hydra_files(launch.context)
    # a job logs to its parent's tracker (a sweep's own server, say)
    tracking = OmegaConf.merge(cfg.tracking, {"tracking_uri": job.tracking_uri}) if job else cfg.tracking
    tracker = make_tracker(tracking, cfg.paths.root_dir) if distributed.is_main() else Tracker()
    close_runs_of_dead_processes(cfg, tracker)
    run_name = cfg.get("run_name") or (job.run_name(cfg.stage.name) if job else
                                       f"{cfg.stage.name}-{cfg.model.name}-{redact_text(data_name(cfg.data))}")
    tags = {"stage": cfg.stage.name, "model": cfg.model.name, "data": redact_text(data_name(cfg.data)),
            "hardware": cfg.hardware.name, "git_commit": jobs.git_commit(), "rlhf_exp_version": rlhf_exp.__version__,
            "run_dir": str(run_dir), "precision": cfg.hardware.precision, "precision_reason": launch.precision_reason,
            "overrides": " ".join(launch.context.redacted_overrides()), **launch.lineage_tags, **(job.tags() if job else {})}
    tags["mlflow.note.content"] = redact_text(cfg.get("description") or description(cfg, tags["overrides"]))
    status = "FAILED"
    earlier = resumed_run(cfg, tracker)
    continued = earlier if earlier and cfg.tracking.get("continue_on_resume", True) else None
    if cfg.stage.get("resume_from"):
        tags["resumed_from"] = str(cfg.stage.resume_from)
    # data, weights and the resumed checkpoint load before the tracker run opens (or reopens): what they
    # refuse (a bad data file, changed data on resume) creates no FAILED run and leaves a resumed run as it was
    trainer = launch.spec.trainer(cfg=cfg, tracker=tracker, run_dir=run_dir, memory_plan=launch.plan)
    try:
        with out_of_memory_reported(cfg, launch.spec, launch.plan):
            trainer.prepare()
        plan_the_data(cfg, trainer)
    except BaseException:
        trainer.close()
        raise
    tracker.start(run_name, flatten(written), tags, run_dir=run_dir, continue_run=continued,
                  parent_run_id=job.parent_run_id if job else None)
    try:
        record_run(tracker, run_dir, earlier)
        tracker.log_artifact(str(run_dir / "config.yaml"), "config")
        with out_of_memory_reported(cfg, launch.spec, launch.plan):
            metrics = trainer.fit()
        if distributed.is_main() and cfg.tracking.get("log_model"):
            log_final_model(cfg, tracker, run_dir, trainer.step, run_name)
        objective = jobs.objective_of(cfg)[0]
        if job is not None and objective in metrics:  # one column name for every sweep's objective
            tracker.log_metrics({jobs.OBJECTIVE_METRIC: metrics[objective]}, step=trainer.step)
        status = "FINISHED"
        log.info("finished: %s", ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
        return metrics
    except stopping.RunStopped as stop:
        status = "KILLED"
        tracker.set_tags({"stopped_by": signal.Signals(stop.signum).name, "stopped_at_step": stop.step,
                          **({"checkpoint_dir": str(stop.checkpoint)} if stop.checkpoint else {})})
        if distributed.is_main():
            log.warning("%s", stop)
            if stop.checkpoint:
                again = getattr(job, "resume_command", None) or resume_command(stop.checkpoint, launch.context.overrides)
                print(f"{stop}\nresume with:\n  {again}", file=sys.stderr)
        raise
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        trainer.close()
        for log_file in run_dir.glob("*.log"):  # Hydra's job log, failed runs included
            try:
                tracker.log_artifact(str(log_file), "logs")
            except Exception:
                log.exception("could not log %s", log_file)
        tracker.finish(status)
        if status == "FINISHED":
            distributed.close()
