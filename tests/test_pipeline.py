"""experiment=*_pipeline: the stages in order as children of one parent run, inputs named by role, a rerun
that trains nothing, a killed stage resumed, and the data split per phase (rlhf_exp/launch/pipeline.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import ROOT, mlflow_runs, run_cli, tracked_env
from rlhf_exp.config import compose_config
from rlhf_exp.data.splits import split_by_phase
from rlhf_exp.errors import ConfigError
from rlhf_exp.launch.lineage import Source, resolve_references
from rlhf_exp.launch.pipeline import config_hash

QUICK = ["experiment=quick_pipeline", "hardware=cpu", "hardware.num_threads=1"]
ROLES = ["sft", "rm", "judge", "dpo", "grpo", "eval"]


def children_by_role(db: Path):
    client, runs = mlflow_runs(db)
    [parent] = [r for r in runs if r.data.tags.get("rlhf_exp.role") == "pipeline"]
    children = {}  # role -> its newest run (a stage stopped before its first checkpoint is made again)
    for r in sorted(runs, key=lambda r: r.info.start_time):
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id:
            children[r.data.tags["pipeline_role"]] = r
    return parent, children, runs


def test_the_pipeline_runs_each_stage_as_a_child_with_its_inputs_by_role_and_a_rerun_trains_nothing(tmp_path):
    """Its first launch gets SIGTERM (docker stop, a SLURM preemption) in the eval stage's first pass: the
    pass stops at its next batch, the eval child and the parent close KILLED, the process exits 143, and the
    second launch makes the evaluation alone."""
    env = tracked_env(tmp_path)
    stopped = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "sigterm_in_eval.py"), *QUICK],
                             cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env}, timeout=900)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    db = tmp_path / "m.db"
    parent, children, _ = children_by_role(db)
    assert parent.info.status == "KILLED" and children["eval"].info.status == "KILLED"
    assert children["eval"].data.tags["stopped_by"] == "SIGTERM" and "eval/judge_score" not in children["eval"].data.metrics
    assert all(children[role].info.status == "FINISHED" for role in ROLES[:-1])
    assert "pipeline killed: MLflow parent run" in stopped.stdout
    killed_eval = children["eval"].info.run_id

    done = run_cli(*QUICK, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(f"pipeline: {role} already finished" in done.stdout for role in ROLES[:-1])
    assert "pipeline: eval was stopped before its first checkpoint: starting it again" in done.stdout
    parent_after, children, runs = children_by_role(db)
    assert parent_after.info.run_id == parent.info.run_id and children["eval"].info.run_id != killed_eval
    assert parent_after.info.status == "FINISHED" and sorted(children) == sorted(ROLES)
    assert all(r.info.status == "FINISHED" for r in children.values())
    sft = children["sft"]
    sft_final = Path(sft.data.tags["run_dir"]) / "checkpoints" / "final"
    for role in ("rm", "judge", "dpo", "grpo"):  # model.init_from: run:sft, resolved and recorded
        assert children[role].data.tags["init_from"] == str(sft_final)
        assert children[role].data.tags["init_from_run_id"] == sft.info.run_id
        assert children[role].data.tags["pipeline_run_id"] == parent.info.run_id
    rm_final = Path(children["rm"].data.tags["run_dir"]) / "checkpoints" / "final"
    assert children["grpo"].data.params["reward.fn.path"] == str(rm_final)
    assert children["grpo"].data.tags["input.reward.fn.path.run_id"] == children["rm"].info.run_id
    assert children["judge"].data.params["data.phase"] == "judge" and children["rm"].data.params["data.phase"] == "rm"
    # the evaluation: every policy, both judges, printed and logged
    summary = (Path(children["eval"].data.tags["run_dir"]) / "eval" / "summary.md").read_text()
    for name in ("base", "sft", "dpo", "grpo"):
        assert f"| {name} |" in summary
    assert "judge win vs sft" in summary and "judge accuracy on" in done.stdout
    metrics = children["eval"].data.metrics
    assert 0 <= metrics["eval/dpo/judge_win_vs_sft_ci_low"] <= metrics["eval/dpo/judge_win_vs_sft"] <= \
        metrics["eval/dpo/judge_win_vs_sft_ci_high"] <= 1
    assert metrics["eval/sft/kl_k1_seq"] == 0.0  # KL of the reference to itself
    # DPO's implicit reward against its own reference (SFT) on the same 8 held-out pairs DPO evaluated on;
    # a pair whose margin is within rounding of 0 may rank differently in another batch
    assert "dpo DPO implicit reward (sft as reference) accuracy on 8" in done.stdout
    assert abs(metrics["eval/dpo/dpo_implicit_accuracy"] - children["dpo"].data.metrics["eval/implicit_accuracy"]) \
        <= 1 / 8 + 1e-9
    assert "eval/grpo/dpo_implicit_accuracy" not in metrics and "eval/sft/dpo_implicit_accuracy" not in metrics
    assert metrics["eval/judge_score"] == metrics["eval/grpo/judge_score"]  # the last policy listed
    # the parent carries the headline figures (its columns in the runs table) and the table as an MLflow table
    headline = parent_after.data.metrics
    for name in ("eval/dpo/judge_win_vs_reference", "eval/grpo/judge_lc_win_vs_sft", "eval/grpo/kl_k1_seq",
                 "eval/base/length", "eval/judge/pair_accuracy"):
        assert headline[name] == metrics[name], name
    assert "eval/dpo/judge_win_vs_reference_ci_low" not in headline
    assert "pipeline finished: MLflow parent run" in done.stdout
    # its view: the parent's row, the headline figures as columns, on the UI's model-training side
    view = done.stdout.split("the policies side by side: ", 1)[1].split()[0]
    assert view.endswith("&workflowType=machine_learning") and "viewStateShareKey=pipeline-" in view
    client = mlflow_runs(db)[0]
    state = json.loads(client.get_experiment(parent.info.experiment_id).tags[
        "mlflow.sharedViewState." + view.split("viewStateShareKey=")[1].split("&")[0]])
    assert state["searchFilter"] == f"attributes.run_id = '{parent.info.run_id}'"
    assert "metrics.`eval/dpo/judge_win_vs_reference`" in state["selectedColumns"]
    # a finished stage keeps its weights, not what only resuming it needs (pipeline.keep_training_state=false)
    sft_dir = Path(sft.data.tags["run_dir"])
    assert (sft_final / "model.safetensors").is_file() and not (sft_final / "trainer_state.pt").exists()
    assert not list((sft_dir / "checkpoints").glob("step_*"))

    again = run_cli(*QUICK, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already finished with this config") == len(ROLES)
    assert len(mlflow_runs(db)[1]) == len(runs)  # no new run: nothing trained

    # a changed DPO setting reruns DPO and what reads it (eval), not the rest
    changed = run_cli(*QUICK, "pipeline.extra.dpo=['stage.max_steps=2','stage.beta=0.3']", env=env)
    assert changed.returncode == 0, changed.stderr[-3000:]
    skipped = {role for role in ROLES if f"pipeline: {role} already finished" in changed.stdout}
    assert skipped == {"sft", "rm", "judge", "grpo"}


def test_a_pipeline_killed_during_its_rm_stage_resumes_there_when_run_again(tmp_path):
    env = {**os.environ, **tracked_env(tmp_path), "HANG_AT_STEP": "3", "HANG_IN_STAGE": "rm",
           "HANG_MARKER_DIR": str(tmp_path)}
    args = [*QUICK, "pipeline.until=rm"]
    job = subprocess.Popen([sys.executable, str(ROOT / "tests" / "helpers" / "hang_at_step.py"), *args], cwd=ROOT,
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (tmp_path / "rank0").is_file():
        assert job.poll() is None and time.time() < deadline, "the pipeline ended before the RM's step 3"
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    parent, children, _ = children_by_role(tmp_path / "m.db")
    assert children["rm"].info.status == "RUNNING"  # killed mid-stage: its checkpoint at step 2 is on disk
    killed_rm = children["rm"].info.run_id

    done = run_cli(*args, env=tracked_env(tmp_path) | {})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pipeline: sft already finished" in done.stdout
    assert "pipeline: rm was interrupted: resuming from" in done.stdout
    parent_after, children, _ = children_by_role(tmp_path / "m.db")
    assert parent_after.info.run_id == parent.info.run_id and parent_after.info.status == "FINISHED"
    rm = children["rm"]
    assert rm.info.run_id == killed_rm and rm.info.status == "FINISHED"  # the same MLflow run, continued
    assert rm.data.tags["resume_count"] == "1" and rm.data.tags["resumed_from"].endswith("step_000002")
    assert sorted(children) == ["rm", "sft"]  # pipeline.until=rm
    assert not list((Path(rm.data.tags["run_dir"]) / "checkpoints").glob("step_*"))  # finished: dropped


def test_keep_checkpoints_deletes_older_step_checkpoints_only(tmp_path):
    from rlhf_exp.checkpoint import TRAINER_STATE, prune_step_checkpoints

    for name in ("step_000002", "step_000010", "step_000004", "final", "best"):
        (tmp_path / name).mkdir()
        (tmp_path / name / TRAINER_STATE).write_bytes(b"x")
    (tmp_path / "step_000012.partial").mkdir()  # being written: not whole, not ours to delete
    deleted = prune_step_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in deleted) == ["step_000002", "step_000004"]  # by step, not by listing order
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "final", "step_000010", "step_000012.partial"]


def test_phases_take_disjoint_prompts_and_share_one_held_out_set():
    from rlhf_exp.data.formats import SFTExample

    def Row(prompt):
        return SFTExample(prompt, " a summary")

    rows = [Row(f"post {i % 700}") for i in range(1400)]  # two rows per prompt, as TL;DR's pairs
    shares = {"sft": 2, "rm": 3, "rl": 3, "judge": 2}
    splits = {phase: split_by_phase(rows, phase, shares, 0.1, seed=42) for phase in shares}
    trains = {phase: {r.prompt for r in train} for phase, (train, _) in splits.items()}
    for a in shares:
        for b in shares:
            if a < b:
                assert not trains[a] & trains[b], (a, b)
    held_out = {p: {r.prompt for r in val} for p, (_, val) in splits.items()}
    assert len({frozenset(v) for v in held_out.values()}) == 1  # one held-out set for every phase
    assert not held_out["sft"] & set().union(*trains.values())
    # a list of other rows (the SFT posts beside the pairs) holds out the same prompts
    other = split_by_phase([Row(f"post {i}") for i in range(700)], "sft", shares, 0.1, seed=42)[1]
    assert {r.prompt for r in other} == held_out["sft"]
    counts = {phase: len(t) for phase, t in trains.items()}
    assert 0.15 < counts["sft"] / sum(counts.values()) < 0.25 and 0.25 < counts["rm"] / sum(counts.values()) < 0.35


def test_a_reference_to_no_stage_names_the_key_and_what_exists(tmp_path):
    cfg = OmegaConf.create({"model": {"init_from": "run:sft"}, "reward": {"fn": {"path": "run:rm@best"}}})
    (tmp_path / "sft" / "checkpoints" / "final").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"reward\.fn\.path.*run:rm@best names no finished stage.*sft"):
        resolve_references(OmegaConf.create(OmegaConf.to_container(cfg)), {"sft": Source(tmp_path / "sft")})
    (tmp_path / "rm" / "checkpoints" / "final").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"reward\.fn\.path.*checkpoints/best does not exist"):
        resolve_references(cfg, {"sft": Source(tmp_path / "sft"), "rm": Source(tmp_path / "rm")})


def test_the_config_hash_ignores_where_things_go_but_not_what_is_computed():
    base = compose_config(["stage=dpo"])
    moved = compose_config(["stage=dpo", "paths.runs_dir=/elsewhere", "tracking.experiment_name=x"])
    changed = compose_config(["stage=dpo", "stage.beta=0.3"])
    assert config_hash(base) == config_hash(moved) != config_hash(changed)


@pytest.mark.parametrize("experiment", ["tldr_pipeline", "hh_pipeline", "quickstart", "quick_pipeline"])
def test_every_role_of_a_pipeline_takes_extra_overrides_from_the_command_line(experiment):
    """`pipeline.extra.<role>=[...]` is the documented way to change one stage; with `extra: {}` in the
    config Hydra refused it (the key was not in the struct config)."""
    from rlhf_exp.launch.pipeline import stage_overrides

    cfg = compose_config([f"experiment={experiment}", "pipeline.extra.dpo=['stage.beta=0.3']"])
    assert set(cfg.pipeline.extra) >= set(cfg.pipeline.stages)
    assert stage_overrides(cfg.pipeline, "dpo", [])[-1] == "stage.beta=0.3"


def test_the_eval_stage_of_a_pipeline_takes_the_prompts_every_phase_held_out(tokenizer):
    """stage=eval without data.phase split by val_size: its prompts were drawn apart from the phases' held-out
    set, so SFT and the RMs could have trained on prompts the policies were then judged on."""
    from rlhf_exp.data import load_preference_splits, load_sft_splits

    cfg = compose_config(["experiment=tldr_pipeline"])
    eval_overrides = [o for o in cfg.pipeline.stages.eval if o.startswith("data.")]
    assert "data.phase=eval" in eval_overrides
    data = lambda phase: compose_config(["data=tldr", *cfg.pipeline.common, f"data.phase={phase}"]).data
    for load in (load_sft_splits, load_preference_splits):
        no_train, held_out = load(data("eval"), tokenizer, 42)
        assert not no_train and held_out
        judged = {x.prompt for x in held_out}
        for phase in ("sft", "rm", "rl", "judge"):
            train, val = load(data(phase), tokenizer, 42)
            assert not judged & {x.prompt for x in train}
            assert [x.prompt for x in val] == [x.prompt for x in held_out]


def test_the_parent_records_what_each_stage_ran_with_not_the_pipelines_definition():
    """The quickstart's pipeline.extra sets SFT's stage.max_steps=10 over the definition's 20: the parent's param
    must say 10 (it said 20, what did not run)."""
    from omegaconf import OmegaConf

    from rlhf_exp.launch.pipeline import last_of_each_key, stage_overrides

    spec = OmegaConf.create({"common": ["data=tldr"], "stages": {"sft": ["stage=sft", "stage.max_steps=20"]},
                             "extra": {"sft": ["stage.max_steps=10"]}})
    ran = last_of_each_key(stage_overrides(spec, "sft", ["hardware=cpu", "+x=1", "x=2"]))
    assert ran == ["data=tldr", "stage=sft", "hardware=cpu", "x=2", "stage.max_steps=10"]


def test_the_offline_algorithms_run_from_one_sft_start_and_share_one_evaluation_table(tmp_path):
    """sweep=offline_algorithms on the tiny model (experiment=quick_offline_algorithms): DPO, IPO, SimPO, ORPO and KTO
    each train from the SFT stage's checkpoint, and stage=eval compares all five with SFT on the same prompts:
    each one's judge win rate against SFT, its length-controlled win rate and its KL to SFT."""
    done = run_cli("experiment=quick_offline_algorithms", "hardware=cpu", "hardware.num_threads=1",
                   "stage.max_steps=2", "stage.eval_examples=8", env=tracked_env(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    parent, children, _ = children_by_role(tmp_path / "m.db")
    algorithms = ["dpo", "ipo", "simpo", "orpo", "kto"]
    assert parent.info.status == "FINISHED" and sorted(children) == sorted(["sft", "judge", *algorithms, "eval"])
    sft_final = children["sft"].data.tags["checkpoint_dir"]
    for role in algorithms:
        assert children[role].data.params["model.init_from"] == sft_final, role
    assert children["kto"].data.tags["stage"] == "kto"
    assert [children[r].data.params["stage.loss_type"] for r in algorithms[:4]] == ["sigmoid", "ipo", "simpo", "orpo"]
    evaluated = children["eval"].data.metrics
    # DPO's implicit accuracy is a log-ratio to the start: for DPO and IPO, not the reference-free SimPO and ORPO
    assert {f"eval/{r}/dpo_implicit_accuracy" in evaluated for r in ("dpo", "ipo")} == {True}
    assert {f"eval/{r}/dpo_implicit_accuracy" in evaluated for r in ("simpo", "orpo", "kto")} == {False}
    for role in algorithms:
        for name in ("judge_win_vs_sft", "judge_win_vs_sft_ci_low", "judge_lc_win_vs_sft", "kl_k1_seq", "length"):
            assert f"eval/{role}/{name}" in evaluated, (role, name)
    # the table's columns come from every row: SFT's own row, first here, has no win against itself
    summary = (Path(children["eval"].data.tags["run_dir"]) / "eval" / "summary.md").read_text()
    header = next(line for line in summary.splitlines() if line.startswith("| policy"))
    assert "judge win vs sft" in header and "judge LC win vs sft" in header
