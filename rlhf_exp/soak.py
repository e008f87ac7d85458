"""`python -m rlhf_exp.soak --jobs 50 --workers 4`: many tiny runs at once against one tracker; count everything.

Starts an `mlflow server` on 127.0.0.1 (or uses `--tracking-uri`, e.g. a fresh `sqlite:///...` file),
runs `--jobs` tiny SFT runs (seeds 0..N-1) with `--workers` in parallel, then counts, run by run,
what reached the tracker against what each run wrote: its params (the run folder's config.yaml),
and every metric value (the run folder's tracking outbox). Any job that failed, any run missing or
not FINISHED, any param or metric value missing is reported, and the exit code is 1. `make soak`
runs the 50-job version; tests/test_soak.py a 6-job one.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from rlhf_exp.tracking.server import MlflowServer

# a run of seconds with every part of a real one (eval, samples, checkpoint, plots)
TINY_JOB = ["model=tiny", "hardware=cpu", "hardware.precision=fp32", "hardware.num_threads=1", "stage.max_steps=3",
            "stage.batch_size=4", "hardware.micro_batch_size.sft=2", "stage.eval_examples=8", "stage.num_samples=1",
            "stage.generation.max_new_tokens=4", "data.max_prompt_tokens=48", "data.max_response_tokens=16"]


@dataclass
class SoakReport:
    jobs: int
    failed_jobs: list[str] = field(default_factory=list)
    runs: int = 0
    finished_runs: int = 0
    params_expected: int = 0
    params_found: int = 0
    metrics_expected: int = 0
    metrics_found: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed_jobs and not self.problems and self.runs == self.finished_runs == self.jobs

    def summary(self) -> str:
        return (f"{self.jobs} jobs, {len(self.failed_jobs)} failed; runs {self.runs} ({self.finished_runs} FINISHED); "
                f"params {self.params_found}/{self.params_expected}; metric values "
                f"{self.metrics_found}/{self.metrics_expected}; problems: {len(self.problems)}")


# Each job is a process of its own (its own tracker client, its own race to create a new database),
# forked from a process that imported the package once, as a joblib sweep's workers are: the ~9 s of
# imports is paid once per soak, not once per job.
_JOBS = multiprocessing.get_context("forkserver")
_JOBS.set_forkserver_preload(["rlhf_exp.__main__", "rlhf_exp.launch.run", "rlhf_exp.stages.sft",
                              "mlflow.store.tracking.sqlalchemy_store"])


def _job_process(args: list[str], env: dict[str, str], log_path: str) -> None:
    """`python -m rlhf_exp <args>` in this (forked) process, its output into `log_path`."""
    os.environ.update(env)
    output = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(output, 1)
    os.dup2(output, 2)
    sys.argv = ["rlhf_exp", *args]
    from rlhf_exp.__main__ import cli

    cli()


def run_job(index: int, uri: str, folder: Path, experiment: str, extra: list[str]) -> tuple[int, str]:
    env = {"MLFLOW_TRACKING_URI": uri, "RLHF_EXP_RUNS_DIR": str(folder / "runs"), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    args = [*TINY_JOB, f"seed={index}", f"run_name=soak-{index}", f"tracking.experiment_name={experiment}", *extra]
    log_path = folder / "logs" / f"job-{index}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    job = _JOBS.Process(target=_job_process, args=(args, env, str(log_path)), name=f"soak-job-{index}")
    job.start()
    job.join(timeout=1800)
    if job.exitcode is None:
        job.kill()
        job.join()
    return job.exitcode, log_path.read_text(errors="replace")[-1500:]


def flat(container, prefix: str = "") -> dict[str, str]:
    from rlhf_exp.config import flatten

    return {k: str(v) for k, v in flatten(container, prefix).items()}


def count(uri: str, folder: Path, experiment: str, report: SoakReport) -> SoakReport:
    """Compare what each run folder under `folder` wrote with what the tracker holds."""
    from mlflow.tracking import MlflowClient

    from rlhf_exp.tracking.outbox import OUTBOX, records
    from rlhf_exp.tracking.records import RUN_RECORD

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=10_000) if found else []
    report.runs = len(runs)
    report.finished_runs = sum(r.info.status == "FINISHED" for r in runs)
    by_id = {r.info.run_id: r for r in runs}
    for record in sorted(folder.glob(f"**/{RUN_RECORD}")):
        run_dir = record.parent
        run = by_id.get(json.loads(record.read_text())["run_id"])
        if run is None:
            report.problems.append(f"{run_dir}: its run is not in the tracker")
            continue
        expected = flat(yaml.safe_load((run_dir / "config.yaml").read_text()))
        report.params_expected += len(expected)
        report.params_found += sum(run.data.params.get(k) == v[:6000] for k, v in expected.items())
        sent = {(name, r["step"]) for r in records(run_dir / OUTBOX) if r["kind"] == "metrics" for name in r["values"]}
        report.metrics_expected += len(sent)
        on_server = {(name, m.step) for name in {n for n, _ in sent}
                     for m in client.get_metric_history(run.info.run_id, name)}
        report.metrics_found += len(sent & on_server)
        if sent - on_server:
            report.problems.append(f"{run_dir}: {len(sent - on_server)} metric values missing")
    if report.params_found != report.params_expected:
        report.problems.append(f"{report.params_expected - report.params_found} params missing or different")
    return report


def soak(jobs: int, workers: int, folder: Path, tracking_uri: str | None = None, extra: list[str] = ()) -> SoakReport:
    """Run the soak in `folder` (an mlflow server of its own unless `tracking_uri` is given)."""
    folder.mkdir(parents=True, exist_ok=True)
    server = None
    if tracking_uri is None:
        server = MlflowServer(f"sqlite:///{folder / 'server.db'}", str(folder / "artifacts"), serve_artifacts=True)
        tracking_uri = server.uri
    experiment = f"soak-{int(time.time())}"
    report = SoakReport(jobs=jobs)
    try:
        with ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(run_job, i, tracking_uri, folder, experiment, list(extra)) for i in range(jobs)]
            for i, future in enumerate(tqdm(futures, desc=f"soak ({workers} at a time)", unit="job")):
                code, err = future.result()
                if code != 0:
                    report.failed_jobs.append(f"job {i}: rc {code}: {err.strip().splitlines()[-1] if err.strip() else ''}")
        return count(tracking_uri, folder / "runs", experiment, report)
    finally:
        if server is not None:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_exp.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--tracking-uri", default=None, help="default: an mlflow server on 127.0.0.1 of its own")
    parser.add_argument("--folder", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args(argv)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="rlhf_exp-soak-"))
    started = time.time()
    report = soak(args.jobs, args.workers, folder, args.tracking_uri)
    print(f"soak: {report.summary()} in {time.time() - started:.0f} s ({folder})")
    for line in report.failed_jobs + report.problems:
        print(f"  {line}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
