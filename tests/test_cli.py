"""The real entrypoint, as a user types it."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import mlflow_runs, run_cli


@pytest.fixture(autouse=True)
def _runs_outside_the_project(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_EXP_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("RLHF_EXP_MULTIRUNS_DIR", str(tmp_path / "multiruns"))


cli = run_cli


def test_help_lists_the_config_groups():
    out = cli("--help")
    assert out.returncode == 0, out.stderr
    for group in ("model:", "data:", "stage:", "hardware:", "tracking:", "reward:", "experiment:", "sweep:"):
        assert group in out.stdout, group
    assert "smollm2_135m" in out.stdout and "tiny" in out.stdout


def test_cfg_job_prints_the_composed_config():
    out = cli("model=tiny", "stage.lr=0.001", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "name: tiny" in out.stdout and "lr: 0.001" in out.stdout and "name: sft" in out.stdout
    assert "precision: auto" in out.stdout and "master_weights: fp32" in out.stdout


def test_sft_tiny_three_steps_leaves_one_finished_run_with_loss_metrics(tmp_path):
    """The issue's command, verbatim (run folders sent to tmp_path by environment)."""
    db = tmp_path / "m.db"
    out = cli("stage=sft", "model=tiny", "hardware=cpu", "stage.max_steps=3",
              env={"MLFLOW_TRACKING_URI": f"sqlite:///{db}", "RLHF_EXP_RUNS_DIR": str(tmp_path / "runs")}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    client, runs = mlflow_runs(db)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert len(client.get_metric_history(runs[0].info.run_id, "train/loss")) == 3
    assert client.get_metric_history(runs[0].info.run_id, "eval/loss")
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts beside the SQLite file
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "outputs").exists()  # nothing relative to the cwd
    assert Path(runs[0].data.tags["run_dir"]).is_relative_to(tmp_path / "runs")


def test_bad_input_stops_with_the_key_and_exit_code_2(tmp_path):
    out = cli("model=tiny", "stage.lr=-0.1", env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    assert out.returncode == 2
    assert "config key `stage.lr`: must be > 0 (got -0.1)" in out.stderr
    assert "Traceback" not in out.stderr

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "completion": "c"}\n{"prompt": \n')
    out = cli("model=tiny", "data=jsonl", f"data.path={bad}", "data.val_size=1", f"paths.runs_dir={tmp_path}/runs",
              env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    assert out.returncode == 2
    assert f"{bad}, line 2: invalid JSON" in out.stderr

    out = cli("model=no_such_model")
    assert out.returncode != 0 and "no_such_model" in out.stderr


@pytest.mark.parametrize(("overrides", "key"), [
    (["hardware=h100"], "hardware"),  # no GPU here (skipped where there is one)
    (["stage=grpo", "reward=reward_model", "reward.fn.path=/no/such/rm"], "reward.fn.path"),
    (["data=jsonl", "data.path=/no/such.jsonl"], "data.path"),
    (["stage=eval", "stage.batch_size=8", "stage.judge=/no/such/judge"], "stage.judge"),
    (["stage=eval", "stage.batch_size=8", "stage.policies={dpo: /no/such/policy}"], "stage.policies.dpo"),
], ids=["no-gpu", "reward-model", "data-file", "judge", "policy"])
def test_a_launch_refused_for_a_missing_input_leaves_no_mlflow_run(tmp_path, overrides, key):
    """Checked before the tracker run is created: a refused launch is not a FAILED run in the UI."""
    import torch

    from helpers import tiny_config
    from rlhf_exp.launch import run as app
    from rlhf_exp.errors import ConfigError

    if overrides == ["hardware=h100"] and torch.cuda.is_available():
        pytest.skip("a GPU is visible: hardware=h100 is not refused")
    with pytest.raises(ConfigError, match=f"config key `{key}`"):
        app.run(tiny_config(tmp_path, *overrides))
    assert mlflow_runs(tmp_path / "mlflow.db")[1] == []


def test_what_hydra_knew_of_the_launch_is_read_once_and_handed_down(tmp_path):
    """launch.jobs.LaunchContext is the one read of Hydra's global state: a run started from Python has the
    empty context (a fresh run folder, no sweep job, no overrides), and a handed-down one decides the run
    folder, the resume command and the sweep job. Catches a launcher that reads Hydra again (and so sees
    nothing from Python, or a pipeline's own folder for each of its stages)."""
    import json

    from helpers import tiny_config
    from rlhf_exp.launch.jobs import SWEEP_RECORD, LaunchContext
    from rlhf_exp.launch.run import resume_command, run_dir_for

    empty = LaunchContext.from_hydra()
    assert empty == LaunchContext() and not empty.in_sweep and empty.sweep_job() is None
    cfg = tiny_config(tmp_path)
    assert run_dir_for(cfg, empty).parent == tmp_path / "runs" / "sft"
    assert run_dir_for(cfg, LaunchContext(output_dir=tmp_path / "hydra_out")) == tmp_path / "hydra_out"
    overrides = ("stage=dpo", "stage.resume_from=/old", "+model.hub_token=hf_secret")
    assert resume_command("/runs/x/checkpoints/step_000002", overrides) == \
        "python -m rlhf_exp stage=dpo +model.hub_token=hf_secret stage.resume_from=/runs/x/checkpoints/step_000002"
    (tmp_path / SWEEP_RECORD).write_text(json.dumps({"parent_run_id": "p", "tracking_uri": "sqlite:///m.db",
                                                     "sweep_id": "s", "swept": ["stage.beta"], "job_offset": 2}))
    job = LaunchContext(overrides=("stage.beta=0.3", "+model.hub_token=hf_secret"), sweep_dir=tmp_path,
                        job_number=1).sweep_job()
    assert (job.parent_run_id, job.number, job.swept) == ("p", 3, {"stage.beta": "0.3"})
    assert "hf_secret" not in " ".join(job.overrides)  # tags and names never carry a secret


def test_help_is_the_groups_a_person_picks_and_where_to_look_next():
    """Hydra's help listed every folder of conf/ (schemas, the files other groups compose) and the whole default
    config: 196 lines. A group added to conf/ must be either listed or declared composed."""
    from rlhf_exp.config import CONF_DIR
    from rlhf_exp.launch.cli_help import CHOSEN_GROUPS, COMPOSED_GROUPS

    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    assert groups == set(CHOSEN_GROUPS) | set(COMPOSED_GROUPS), groups ^ (set(CHOSEN_GROUPS) | set(COMPOSED_GROUPS))
    out = cli("--help")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) < 45, len(lines)
    assert not any(line.lstrip().startswith(("schema", "stage/base", "experiment_stage")) for line in lines)
    for flag in ("--cfg job", "--info defaults", "plan=true", "--hydra-help", "--version"):
        assert flag in out.stdout, flag
    assert "dpo, eval, grpo, kto, ppo, rm, sft" in out.stdout  # the options of each group, read from conf/


def test_version_is_the_packages_and_tab_completion_installs():
    from importlib import metadata

    out = cli("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"rlhf_exp {metadata.version('rlhf_exp')} (torch ") and "Hydra" not in out.stdout
    script = cli("-sc", "install=bash")  # what `eval "$(rlhf-exp -sc install=bash)"` runs (README)
    assert script.returncode == 0, script.stderr[-2000:]
    assert "complete" in script.stdout and "hydra_bash_completion" in script.stdout


def test_a_resume_from_the_command_line_goes_on_in_the_run_folder_it_continues(tmp_path):
    """Hydra made a new run folder for every launch, so a resumed run split its checkpoints over two folders (the
    first without final/). The command line points Hydra's folder at the continued run's; a sweep, or a command
    that sets hydra.run.dir itself, is left alone."""
    from rlhf_exp.__main__ import resumed_run_folder

    run = tmp_path / "runs" / "sft" / "2026-12-07_06-00-00_ab12cd"
    (run / "checkpoints" / "step_000002").mkdir(parents=True)
    for given in (run, run / "checkpoints" / "step_000002"):
        assert resumed_run_folder(["model=tiny", f"stage.resume_from={given}"]) == [f"hydra.run.dir='{run}'"]
    assert resumed_run_folder(["-m", f"stage.resume_from={run}"]) == []
    assert resumed_run_folder([f"stage.resume_from={run}", "hydra.run.dir=/elsewhere"]) == []
    assert resumed_run_folder(["model=tiny"]) == [] and resumed_run_folder([f"stage.resume_from={tmp_path}"]) == []


def test_the_console_keeps_the_projects_lines_and_library_warnings_not_library_notices():
    """huggingface_hub printed "Model weights successfully saved to ...partial!" at every checkpoint of `make run`
    (its logger is named by its file's path, so no level setting reaches it): a library's INFO goes, this
    project's stays, a library's WARNING stays, and the known warnings that say nothing go."""
    import logging

    from rlhf_exp.logs import LibraryNoticesFilter

    def record(name: str, level: int, message: str) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, message, None, None)

    keep = LibraryNoticesFilter().filter
    assert not keep(record("/x/site-packages/huggingface_hub/serialization/_torch.py", logging.INFO,
                           "Model weights successfully saved to /r/checkpoints/final.partial!"))
    assert keep(record("rlhf_exp.checkpoint", logging.INFO, "checkpoint: /r/checkpoints/final"))
    assert keep(record("hydra.core.utils", logging.INFO, "Launching 2 jobs locally"))
    assert keep(record("transformers.modeling_utils", logging.WARNING, "Some weights were not initialized"))
    assert not keep(record("bitsandbytes.backends.cpu.ops", logging.WARNING, "Failed to load CPU gemm_4bit_forward x"))
