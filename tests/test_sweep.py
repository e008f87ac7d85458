"""Sweeps as experiments: one parent MLflow run per `-m`, a child per job named by its swept values, the
objective returned and ranked, failed jobs kept as FAILED children, and the comparison report."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import PAIRS, ROOT, TINY, mlflow_runs, run_cli, tracked_env
from rlhf_exp.config import compose_config
from rlhf_exp.launch.jobs import SweepJob, objective_of, short_label
from rlhf_exp.launch.sweep import swept_space
from rlhf_exp.tracking.records import PARENT_TAG

DPO = [*TINY, "stage=dpo", *PAIRS, "stage.max_steps=2", "stage.eval_every=1", "stage.eval_examples=8",
       "stage.num_samples=0", "hardware.micro_batch_size.dpo=2"]


def with_hydra_node(*overrides: str):
    """The composed config with its `hydra` node (launcher, sweeper), as `-m` would run it."""
    from hydra import compose, initialize_config_dir

    from rlhf_exp.config import CONF_DIR, register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def sweep_cli(tmp_path: Path, *args: str):
    env = {**tracked_env(tmp_path), "RLHF_EXP_MULTIRUNS_DIR": str(tmp_path / "multi")}
    return run_cli("-m", *args, env=env), tmp_path / "m.db"


def test_a_beta_sweep_is_one_parent_run_with_a_named_child_per_job_and_a_report(tmp_path):
    """Before: three unrelated runs all named dpo-tiny-hh_rlhf, nothing ranking them, no report, and the
    job with a bad beta (exit 2) ended the whole sweep. The bad job is the last: the others ran first."""
    done, db = sweep_cli(tmp_path, *DPO, "stage.beta=0.05,0.3,-1")
    assert done.returncode == 1, done.stderr[-3000:]  # some job failed; the others ran
    client, runs = mlflow_runs(db)
    parents = [r for r in runs if r.data.tags.get("rlhf_exp.role") == "sweep"]
    assert len(parents) == 1
    parent = client.get_run(parents[0].info.run_id)
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda r: int(r.data.tags["sweep_job"]))
    assert len(runs) == 4 and len(children) == 3
    assert [r.info.run_name for r in children] == ["dpo beta=0.05", "dpo beta=0.3", "dpo beta=-1"]
    assert [r.info.status for r in children] == ["FINISHED", "FINISHED", "FAILED"]
    assert "stage.beta" in children[2].data.tags["error"] and "stage.beta=-1" in children[2].data.tags["overrides"]
    for child, beta in zip(children[:2], ("0.05", "0.3")):
        assert child.data.params["stage.beta"] == beta
        assert f"stage.beta={beta}" in child.data.tags["overrides"].split()
        assert child.info.experiment_id == parent.info.experiment_id
        # the objective under one column name: the job's final held-out implicit accuracy
        assert child.data.metrics["objective"] == child.data.metrics["eval/implicit_accuracy"]
    assert parent.info.status == "FINISHED"  # not every job failed
    assert parent.data.params["space.stage.beta"] == "0.05,0.3,-1"
    assert parent.data.params["objective"] == "eval/implicit_accuracy" and parent.data.params["direction"] == "max"
    assert parent.data.tags["jobs_finished"] == "2" and parent.data.tags["jobs_failed"] == "1"
    best = max(children[:2], key=lambda r: (r.data.metrics["objective"], r.info.run_id == parent.data.tags["best_run_id"]))
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.metrics["best/eval/implicit_accuracy"] == best.data.metrics["objective"]
    assert len({r.data.tags["run_dir"] for r in children[:2]}) == 2
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.name == "rlhf_exp/dpo" and experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    [sweep_dir] = (tmp_path / "multi").iterdir()
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert record["parent_run_id"] == parent.info.run_id and record["swept"] == ["stage.beta"]
    report = (sweep_dir / "report" / "report.md").read_text()
    assert report.count("| dpo beta=") == 3 and "| FAILED |" in report
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/beta_vs_metrics.png", "report/curves.png"} <= logged
    assert "2 finished, 1 failed" in done.stdout


def test_a_joblib_sweep_writes_through_a_server_it_starts_and_loses_no_run_param_or_metric(tmp_path):
    """hydra/launcher=joblib runs jobs in worker processes at once; with a SQLite tracking URI the sweep
    starts an mlflow server over that file (sweep.server=auto), every job logs through it, and it stops
    with the sweep. The job with a bad beta is a FAILED child; nothing the others logged is missing."""
    from rlhf_exp.soak import SoakReport, count

    done, db = sweep_cli(tmp_path, "experiment=quick", "stage=dpo", "stage.max_steps=3", "stage.eval_every=3",
                         "stage.beta=0.05,0.1,-1,0.3", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                         "hardware.num_threads=1")
    assert done.returncode == 1, done.stderr[-3000:]
    [sweep_dir] = (tmp_path / "multi").iterdir()
    served = json.loads((sweep_dir / "sweep.json").read_text())["tracking_uri"]
    assert served.startswith("http://127.0.0.1:")
    client, runs = mlflow_runs(db)  # the server has stopped: read its SQLite file
    [parent] = [r for r in runs if r.data.tags.get("rlhf_exp.role") == "sweep"]
    children = sorted((r for r in runs if r is not parent), key=lambda r: int(r.data.tags["sweep_job"]))
    assert [r.data.tags[PARENT_TAG] for r in children] == [parent.info.run_id] * 4
    assert [r.info.status for r in children] == ["FINISHED", "FINISHED", "FAILED", "FINISHED"]
    assert parent.info.status == "FINISHED" and parent.data.params["launcher"] == "JoblibLauncher"
    assert (parent.data.tags["jobs_finished"], parent.data.tags["jobs_failed"]) == ("3", "1")
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert min(r.info.end_time for r in finished) > max(r.info.start_time for r in finished[:2])  # at once
    counted = count(f"sqlite:///{db}", sweep_dir, "rlhf_exp/dpo", SoakReport(jobs=3))
    assert not counted.problems, counted.problems
    assert counted.params_found == counted.params_expected > 3 * 100
    assert counted.metrics_found == counted.metrics_expected > 3 * 20
    with pytest.raises(OSError):  # stopped with the sweep
        socket.create_connection(("127.0.0.1", int(served.rsplit(":", 1)[1])), timeout=2).close()
    from rlhf_exp.launch.report import main as report  # made again later, from the folder: the runs are in the file

    assert report([str(sweep_dir), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "report.md").read_text().count("| dpo beta=") == 4


def test_the_submitit_local_launcher_runs_each_job_in_a_process_of_its_own_and_returns_its_objective(tmp_path):
    """hydra/launcher=submitit_local (what submitit_slurm does on a cluster, here): each job is a new
    process that finds its parent run through sweep.json; what it returns is the sweeper's objective."""
    import pickle

    done, db = sweep_cli(tmp_path, "experiment=quick", "stage=dpo", "stage.max_steps=2", "stage.eval_every=2",
                         "stage.beta=0.05,0.3", "hydra/launcher=submitit_local", "hardware.num_threads=1")
    assert done.returncode == 0, done.stderr[-3000:]
    client, runs = mlflow_runs(db)
    [parent] = [r for r in runs if r.data.tags.get("rlhf_exp.role") == "sweep"]
    children = {r.data.tags["sweep_job"]: r for r in runs if r is not parent}
    assert sorted(children) == ["0", "1"] and parent.data.params["launcher"] == "LocalLauncher"
    assert {r.info.status for r in children.values()} == {"FINISHED"}
    assert {r.data.tags[PARENT_TAG] for r in children.values()} == {parent.info.run_id}
    [sweep_dir] = (tmp_path / "multi").iterdir()
    results = sorted((sweep_dir / ".submitit").glob("*/*_result.pkl"))
    assert len({path.parent.name for path in results}) == 2  # submitit's local job ids are the jobs' pids
    returned = sorted(pickle.loads(path.read_bytes())[1].return_value for path in results)
    assert returned == sorted(r.data.metrics["objective"] for r in children.values())


def test_the_cluster_launcher_configs_compose():
    """conf/hydra/launcher/slurm.yaml extends the plugin's submitit_slurm; ray.yaml names the Ray plugin."""
    slurm = with_hydra_node("hydra/launcher=slurm").hydra.launcher
    assert slurm._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (slurm.gpus_per_node, slurm.timeout_min, slurm.array_parallelism) == (1, 240, 8)
    ray = with_hydra_node("hydra/launcher=ray").hydra.launcher
    assert ray._target_ == "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    assert ray.ray.remote.num_gpus == 1 and ray.ray.init.address is None


def test_an_optuna_study_killed_after_two_trials_continues_to_four_from_its_storage(tmp_path):
    """sweep=optuna keeps its study in SQLite; n_trials is the study's total. The search is SIGKILLed once
    two trials are told (the third may be running: it is marked failed on restart); started again, it
    runs the two that are left, not four more."""
    import optuna
    from optuna.trial import TrialState

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = ["-m", "sweep=optuna", "experiment=quick", "stage.max_steps=2", "stage.eval_every=2",
            "hydra.sweeper.n_trials=4", f"hydra.sweeper.storage={storage}", "hardware.num_threads=1"]
    env = {**os.environ, **tracked_env(tmp_path), "RLHF_EXP_MULTIRUNS_DIR": str(tmp_path / "multi")}
    search = subprocess.Popen([sys.executable, "-m", "rlhf_exp", *args], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def told() -> int:
        try:
            trials = optuna.load_study(study_name="dpo_lr_beta", storage=storage).get_trials(deepcopy=False)
        except KeyError:  # not created yet
            return 0
        return sum(t.state == TrialState.COMPLETE for t in trials)

    deadline = time.time() + 600
    while told() < 2 and search.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(search.pid, signal.SIGKILL)
    search.wait()
    assert told() == 2

    done, db = sweep_cli(tmp_path, *args[1:])
    assert done.returncode == 0, done.stderr[-3000:]
    trials = optuna.load_study(study_name="dpo_lr_beta", storage=storage).get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 4
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in trials)  # none left running
    assert len(trials) - 4 <= 1  # at most the trial the kill interrupted
    assert {t.params["stage.beta"] for t in trials[:2]}.isdisjoint(t.params["stage.beta"] for t in trials[-2:])
    client, runs = mlflow_runs(db)
    # one parent for the study: the killed search's, continued (not a second parent with half the trials)
    [parent] = [r for r in runs if r.data.tags.get("rlhf_exp.role") == "sweep"]
    assert parent.info.status == "FINISHED" and parent.data.tags["resume_count"] == "1"
    assert parent.data.tags["optuna.trials_before"] == "2" and parent.data.tags["optuna.n_trials"] == "4"
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id]
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert sorted(r.data.metrics["objective"] for r in finished) == sorted(t.value for t in trials
                                                                           if t.state == TrialState.COMPLETE)
    assert {r.info.status for r in children} <= {"FINISHED", "KILLED"}  # the interrupted job's, if any
    numbers = [int(r.data.tags["sweep_job"]) for r in children]
    assert sorted(numbers) == list(range(len(children)))  # the continued jobs number on, no clash
    assert parent.data.tags["jobs_finished"] == "4"


def test_a_sweep_whose_every_job_failed_is_a_failed_parent(tmp_path):
    done, db = sweep_cli(tmp_path, *DPO, "stage.beta=-1,-2")
    assert done.returncode == 1
    _, runs = mlflow_runs(db)
    [parent] = [r for r in runs if r.data.tags.get("rlhf_exp.role") == "sweep"]
    assert parent.info.status == "FAILED"
    assert sorted(r.info.status for r in runs if r is not parent) == ["FAILED", "FAILED"]


@pytest.mark.parametrize("stage, metric, direction", [
    ("sft", "eval/loss", "min"), ("rm", "eval/accuracy", "max"), ("dpo", "eval/implicit_accuracy", "max"),
    ("grpo", "eval/reward_mean", "max"), ("ppo", "eval/reward_mean", "max")])
def test_each_stage_names_the_objective_its_sweeps_optimize(stage, metric, direction):
    assert objective_of(compose_config([f"stage={stage}"])) == (metric, direction)


def test_sweep_objective_and_direction_are_settable_and_inferred():
    assert objective_of(compose_config(["stage=dpo", "sweep.objective=eval/margin"])) == ("eval/margin", "max")
    assert objective_of(compose_config(["stage=dpo", "sweep.objective=eval/loss"])) == ("eval/loss", "min")
    assert objective_of(compose_config(["stage=rm", "sweep.objective=eval/ece"])) == ("eval/ece", "min")
    assert objective_of(compose_config(["stage=rm", "sweep.objective=eval/ece", "sweep.direction=max"])) == (
        "eval/ece", "max")


def test_swept_keys_come_from_the_command_line_and_the_preset():
    hydra = OmegaConf.create({"overrides": {"task": ["stage=dpo", "stage.beta=0.05,0.1", "+dpo_loss=ipo,hinge",
                                                     "stage.lr=tag(log, interval(1e-6, 1e-4))"]},
                              "sweeper": {"params": {"model.num_layers": "8,16,30"}}})
    assert swept_space(hydra) == {"model.num_layers": "8,16,30", "stage.beta": "0.05,0.1", "dpo_loss": "ipo,hinge",
                                  "stage.lr": "tag(log, interval(1e-6, 1e-4))"}
    job = SweepJob("p", "sqlite:///x", "s", 3, {"stage.beta": "0.1", "model.num_layers": "8"})
    assert job.run_name("dpo") == "dpo beta=0.1 num_layers=8"
    assert SweepJob("p", "u", "s", 3, {}).run_name("rm") == "rm job 3"
    assert short_label("+dpo_loss") == "dpo_loss"


@pytest.mark.parametrize("preset, stage, key, values", [
    ("dpo_beta", "dpo", "stage.beta", "0.01,0.1,0.5"), ("dpo_loss", "dpo", "+dpo_loss", "sigmoid,ipo,hinge,cdpo"),
    ("rm_size", "rm", "model.num_layers", "8,16,30"), ("clip_ratio", "sft", "stage.clip_ratio", "0.1,0.2,0.3"),
    ("kl_coef", "sft", "stage.kl_coef", "0.0,0.01,0.05,0.2"),
    ("online_algorithms", "grpo", "stage.loss_type", "grpo,dr_grpo,rloo,reinforce_pp,dapo,gspo")])
def test_sweep_presets_set_their_stage_and_search_space(preset, stage, key, values):
    cfg = with_hydra_node(f"sweep={preset}", "hardware=cpu")
    assert cfg.stage.name == stage
    assert cfg.hydra.sweeper.params[key] == values


def test_dpo_loss_options_set_the_loss_and_label_smoothing():
    cdpo = compose_config(["stage=dpo", "+dpo_loss=cdpo"]).stage
    ipo = compose_config(["stage=dpo", "+dpo_loss=ipo"]).stage
    assert (cdpo.loss_type, cdpo.label_smoothing, ipo.loss_type, ipo.label_smoothing) == ("sigmoid", 0.1, "ipo", 0.0)


def fake_sweep(tmp_path: Path, stage: str, key: str, jobs: list[tuple[str, str, dict[str, list[float]]]],
               group: bool = False, parent_tags: dict | None = None):
    """A parent run and its children in a new MLflow database, as a sweep of `stage` over `key` leaves them:
    jobs are (value, status, {metric: values at steps 0, 1, ...}); a swept `group` is no param of its jobs."""
    from mlflow.tracking import MlflowClient

    from helpers import empty_mlflow_db

    client = MlflowClient(f"sqlite:///{empty_mlflow_db(tmp_path / 'r.db')}")
    experiment = client.create_experiment(f"rlhf_exp/{stage}")
    parent = client.create_run(experiment, run_name="sweep", tags={"stage": stage, "rlhf_exp.role": "sweep",
                                                                   **(parent_tags or {})})
    client.log_param(parent.info.run_id, f"space.{key}", ",".join(v for v, _, _ in jobs))
    for number, (value, status, metrics) in enumerate(jobs):
        child = client.create_run(experiment, run_name=f"{stage} {short_label(key)}={value}", tags={
            "mlflow.parentRunId": parent.info.run_id, "sweep_job": str(number),
            "overrides": f"stage={stage} {'+' if group else ''}{key}={value}"})
        if not group:
            client.log_param(child.info.run_id, key, value)
        for name, values in metrics.items():
            for step, v in enumerate(values):
                client.log_metric(child.info.run_id, name, v, step=step)
        client.set_terminated(child.info.run_id, status)
    return client, parent.info.run_id


def table_rows(report: str) -> list[list[str]]:
    lines = [line for line in report.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_the_report_tables_each_job_and_ranks_by_the_objective(tmp_path):
    from rlhf_exp.launch.report import write_report

    client, parent = fake_sweep(tmp_path, "rm", "model.num_layers", [
        ("8", "FINISHED", {"eval/accuracy": [0.5, 0.62], "eval/accuracy_ci_low": [0.4, 0.55],
                           "eval/accuracy_ci_high": [0.6, 0.69], "eval/ece": [0.1, 0.08], "train/loss": [0.7, 0.6]}),
        ("16", "FINISHED", {"eval/accuracy": [0.5, 0.71, 0.66], "eval/accuracy_ci_low": [0.4, 0.6, 0.58],
                            "eval/accuracy_ci_high": [0.6, 0.8, 0.73], "eval/ece": [0.2, 0.05, 0.06]}),
        ("30", "FAILED", {"train/loss": [0.7]}),
    ])
    out = write_report(client, parent, tmp_path / "report")
    report = (out / "report.md").read_text()
    header, *rows = table_rows(report)
    assert header[:5] == ["job", "status", "num_layers", "eval/accuracy (final)", "best (step)"]
    assert [row[:5] for row in rows] == [["rm num_layers=8", "FINISHED", "8", "0.62", "0.62 (1)"],
                                         ["rm num_layers=16", "FINISHED", "16", "0.66", "0.71 (1)"],
                                         ["rm num_layers=30", "FAILED", "30", "", ""]]
    assert rows[1][header.index("eval/ece (final)")] == "0.06"
    assert "Best: **rm num_layers=16**, 0.66" in report and "3 jobs, 2 finished, 1 not" in report
    for png in ("num_layers_vs_metrics.png", "curves.png"):
        assert (out / png).stat().st_size > 10_000 and f"]({png})" in report


def test_the_report_of_an_online_rl_sweep_draws_reward_against_kl_and_a_group_swept_by_name(tmp_path):
    from rlhf_exp.launch.report import load_sweep, write_report

    client, parent = fake_sweep(tmp_path, "grpo", "stage.clip_ratio", [
        (ratio, "FINISHED", {"eval/reward_mean": [0.1, 0.2 + i / 10], "eval/kl_k3": [0.0, 0.01 * (i + 1)],
                             "train/reward_mean": [0.1, 0.3]}) for i, ratio in enumerate(("0.1", "0.2", "0.3"))])
    out = write_report(client, parent, tmp_path / "grpo")
    assert (out / "tradeoff.png").stat().st_size > 10_000 and "](tradeoff.png)" in (out / "report.md").read_text()

    client, parent = fake_sweep(tmp_path / "loss", "dpo", "dpo_loss", [
        (name, "FINISHED", {"eval/implicit_accuracy": [0.5, acc]}) for name, acc in (("ipo", 0.6), ("hinge", 0.7))],
        group=True)
    sweep = load_sweep(client, parent)  # not a param: read back from the overrides tag
    assert [job.swept for job in sweep.jobs] == [{"dpo_loss": "ipo"}, {"dpo_loss": "hinge"}]
    assert (write_report(client, parent, tmp_path / "dpo") / "dpo_loss_vs_metrics.png").is_file()


def test_a_sweep_whose_jobs_tie_on_the_objective_says_tied_instead_of_naming_a_best(tmp_path):
    """Three DPO betas all at 0.5625: the report names no winner (it says tied, lists them, and which one is
    tagged best by the tie rule); one job ahead by a hair is a plain best."""
    from rlhf_exp.launch.jobs import best_with_ties
    from rlhf_exp.launch.report import write_report

    client, parent = fake_sweep(tmp_path, "dpo", "stage.beta", [
        (beta, "FINISHED", {"eval/implicit_accuracy": [0.5, 0.5625]}) for beta in ("0.01", "0.1", "0.5")])
    report = (write_report(client, parent, tmp_path / "tied") / "report.md").read_text()
    assert "**Tied:** dpo beta=0.01, dpo beta=0.1, dpo beta=0.5 all reach 0.5625" in report and "Best:" not in report
    assert best_with_ties([0.5, 0.7, 0.7], lambda v: v, "max") == (0.7, [0.7, 0.7])
    assert best_with_ties([0.5, 0.7, 0.69], lambda v: v, "max") == (0.7, [0.7])
    assert best_with_ties([0.3, 0.2, 0.2], lambda v: v, "min") == (0.2, [0.2, 0.2])


def test_the_optuna_search_space_is_read_from_hydras_sweep_syntax():
    """Each sweep override becomes the Optuna 5 distribution it says (a log interval a log FloatDistribution, an
    int range an IntDistribution whose high is range's last value, not its excluded stop), and the other
    overrides pass to every trial unchanged."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from rlhf_exp.launch.optuna_sweep import search_space

    space, fixed = search_space(["stage.lr=tag(log, interval(1e-6, 1e-4))", "stage.beta=interval(0.01, 0.5)",
                                 "stage.epochs=int(interval(1, 4))", "stage.warmup_ratio=interval(0, 1)", "stage.group_size=range(2, 10, 2)",
                                 "dpo_loss=choice(sigmoid, ipo)", "seed=3", "model=tiny"])
    assert space["stage.lr"] == FloatDistribution(1e-6, 1e-4, log=True)
    assert space["stage.beta"] == FloatDistribution(0.01, 0.5)
    assert space["stage.epochs"] == IntDistribution(1, 4)
    assert space["stage.warmup_ratio"] == FloatDistribution(0.0, 1.0)  # Hydra's interval is float unless cast
    assert space["stage.group_size"] == IntDistribution(2, 8, step=2)
    assert space["dpo_loss"] == CategoricalDistribution(["sigmoid", "ipo"])
    assert fixed == ["seed=3", "model=tiny"]


def test_a_metric_whose_jobs_barely_differ_is_drawn_from_zero_and_says_so(tmp_path):
    """DPO's drift at three betas, 0.0003753 to 0.0003779: an automatic axis spreads these over the whole panel and
    noise reads as an effect. Drawn from zero with the spread written on it; a real spread keeps its own axis."""
    from rlhf_exp.launch.report import load_sweep, swept_figure

    client, parent = fake_sweep(tmp_path, "dpo", "stage.beta", [
        (beta, "FINISHED", {"eval/abs_logratio_per_token": [0.0, drift], "eval/margin": [0.0, margin]})
        for beta, drift, margin in (("0.01", 0.0003753, 0.1), ("0.1", 0.0003779, 0.4), ("0.5", 0.000376, 0.9))])
    figure = swept_figure(load_sweep(client, parent), ["eval/abs_logratio_per_token", "eval/margin"])
    drift_axes, margin_axes = figure.axes
    assert drift_axes.get_ylim()[0] == 0 and any("within 0.7%" in t.get_text() for t in drift_axes.texts)
    assert margin_axes.get_ylim()[0] > 0 and not margin_axes.texts


def test_a_sweeps_own_report_metrics_and_tradeoffs_join_the_stages_with_a_reward_functions_interval(tmp_path):
    """sweep.report_metrics / sweep.tradeoffs (sweep=online_algorithms: accuracy with its Wilson interval, against KL
    and against generated tokens): recorded on the parent, tabled and drawn beside the stage's own."""
    from rlhf_exp.launch.report import REPORT_TAG, interval_of, load_sweep, write_report

    accuracy = "eval/rewards/math_reward/mean"
    assert interval_of(accuracy) == ("eval/rewards/math_reward/ci_low", "eval/rewards/math_reward/ci_high")
    assert interval_of("eval/accuracy") == ("eval/accuracy_ci_low", "eval/accuracy_ci_high")
    extra = {"report_metrics": [accuracy, "train/generated_tokens"],
             "tradeoffs": [["eval/kl_k3", accuracy], ["train/generated_tokens", accuracy]]}
    client, parent = fake_sweep(tmp_path, "grpo", "stage.loss_type", [
        (name, "FINISHED", {accuracy: [0.2, 0.3 + i / 10], "eval/rewards/math_reward/ci_low": [0.1, 0.2 + i / 10],
                            "eval/rewards/math_reward/ci_high": [0.3, 0.4 + i / 10], "eval/kl_k3": [0.0, 0.02],
                            "eval/reward_mean": [0.2, 0.3], "train/generated_tokens": [100.0, 200.0 + i]})
        for i, name in enumerate(("grpo", "dapo"))], parent_tags={REPORT_TAG: json.dumps(extra)})
    sweep = load_sweep(client, parent)
    assert sweep.report_metrics[-2:] == [accuracy, "train/generated_tokens"]
    assert sweep.tradeoffs == [("eval/kl_k3", "eval/reward_mean"), ("eval/kl_k3", accuracy),
                               ("train/generated_tokens", accuracy)]
    out = write_report(client, parent, tmp_path / "report")
    report = (out / "report.md").read_text()
    header, *rows = table_rows(report)
    assert rows[1][header.index("train/generated_tokens (final)")] == "201"
    for png in ("tradeoff.png", "tradeoff_math_reward_vs_kl_k3.png", "tradeoff_math_reward_vs_generated_tokens.png"):
        assert (out / png).stat().st_size > 10_000 and f"]({png})" in report
