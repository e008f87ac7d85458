"""A run SIGKILLed mid-run and resumed from its folder ends where the uninterrupted run ends, bit for
bit, in every stage: the killed run is a real `python -m rlhf_exp` process, killed after it trained
and logged a step past its last checkpoint (two ranks: tests/test_distributed.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import GRPO, PAIRS, PPO, TINY, VARIED, mlflow_runs, run_until_killed, tiny_config, tracked_env
from rlhf_exp.launch.run import run

STAGES = {
    "sft": ["stage.lr=1e-3"],
    # the reference log-probs are precomputed once: a resumed run must reuse the starting policy's
    "dpo": ["stage=dpo", *PAIRS, "hardware.micro_batch_size.dpo=2", "stage.lr=1e-3", "stage.batch_size=4"],
    "rm": ["stage=rm", *PAIRS, "stage.norm_examples=8", "hardware.micro_batch_size.rm=2", "stage.lr=1e-3",
           "stage.batch_size=4"],
    "grpo": [*GRPO, *VARIED, "stage.minibatch_size=4", "hardware.micro_batch_size.grpo=4", "stage.lr=1e-3"],
    # the PPO options whose state lives outside the model: the actor's EMA and the PPO-ptx data stream
    "ppo": [*PPO, "stage.ema_decay=0.9", "stage.ptx_coef=0.5"],
}
FILES = {
    "sft": ["model.safetensors"],
    "dpo": ["model.safetensors"],
    "rm": ["model.safetensors"],  # the head is its score.weight
    "grpo": ["model.safetensors"],
    "ppo": ["model.safetensors", "ema/model.safetensors", "critic/model.safetensors"],
}
RUN = ["stage.max_steps=4", "stage.num_samples=0", "stage.eval_every=null"]


def final_run(tmp_path: Path, stage: str, *overrides: str):
    run(tiny_config(tmp_path, *STAGES[stage], *RUN, *overrides))
    _, runs = mlflow_runs(tmp_path / "mlflow.db")
    return runs[-1]


def assert_same_weights(expected_run, got_run, files: list[str]) -> None:
    for name in files:
        expected, got = (load_file(str(Path(r.data.tags["checkpoint_dir"]) / name)) for r in (expected_run, got_run))
        assert expected.keys() == got.keys(), name
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{name}: {key}"


@pytest.mark.parametrize("stage", list(STAGES))
def test_sigkilled_run_resumed_from_its_folder_ends_with_the_uninterrupted_runs_weights(tmp_path, stage):
    # checkpoints at step 2; killed once step 3 has trained and logged (its work is lost); the
    # uninterrupted run trains here meanwhile
    killed = tmp_path / "killed"
    folder, whole = run_until_killed(killed, 1, [*TINY, *STAGES[stage], *RUN, "stage.save_every=2"], hang_at_step=3,
                                     env=tracked_env(killed), meanwhile=lambda: final_run(tmp_path / "whole", stage))
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step_000002"]
    _, [left] = mlflow_runs(killed / "m.db")
    assert left.info.status == "RUNNING"  # nobody closed it
    # in this process (no start-up to pay); PPO's into a new MLflow run, the others' into the killed one
    new_run = stage == "ppo"
    run(tiny_config(killed, *STAGES[stage], *RUN, f"stage.resume_from={folder}",
                    f"tracking.tracking_uri=sqlite:///{killed / 'm.db'}", f"tracking.continue_on_resume={not new_run}"))
    client, runs = mlflow_runs(killed / "m.db")
    resumed = runs[-1]
    assert_same_weights(whole, resumed, FILES[stage])
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["resumed_from"] == str(folder / "checkpoints" / "step_000002")
    # one run, one folder: the resumed run finishes in the folder it continues (not a second one without step 2)
    assert Path(resumed.data.tags["run_dir"]) == folder and (folder / "checkpoints" / "final").is_dir()
    for key, value in whole.data.metrics.items():
        if key.startswith("train/") and not any(clock in key for clock in ("seconds", "per_s")):
            assert resumed.data.metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    whole_client, _ = mlflow_runs(tmp_path / "whole" / "mlflow.db")
    expected = {m.step: m.value for m in whole_client.get_metric_history(whole.info.run_id, "train/loss")}
    if new_run:  # the killed run is closed KILLED, naming the run that resumed it
        assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]
        assert "SIGKILL" in runs[0].data.tags["killed_note"] and resumed.info.run_id in runs[0].data.tags["killed_note"]
        assert sorted(m.step for m in client.get_metric_history(resumed.info.run_id, "train/loss")) == [3, 4]
        return
    # the killed run goes on: step 3 was logged by the killed process and again after resume, the same value
    assert len(runs) == 1 and resumed.data.tags["resume_count"] == "1" and "SIGKILL" in resumed.data.tags["killed_note"]
    logged = client.get_metric_history(resumed.info.run_id, "train/loss")
    assert {m.step for m in logged} == set(expected) == {1, 2, 3, 4}
    for m in logged:
        assert m.value == pytest.approx(expected[m.step], rel=1e-6), m.step


def test_a_run_folder_resumes_from_its_newest_whole_checkpoint(tmp_path):
    """What a SIGKILLed run resumes from: never a checkpoint cut off mid-write (`.partial`, or a folder
    without its trainer state)."""
    from rlhf_exp.checkpoint import TRAINER_STATE, resume_point
    from rlhf_exp.errors import ConfigError

    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    with pytest.raises(ConfigError) as none_yet:
        resume_point(tmp_path / "run")
    assert none_yet.value.key == "stage.resume_from" and "stage.save_every" in str(none_yet.value)
    for name, whole in [("step_000002", True), ("step_000010", True), ("step_000012.partial", True),
                        ("step_000014", False), ("step_000009", True)]:
        (checkpoints / name).mkdir()
        if whole:
            (checkpoints / name / TRAINER_STATE).write_bytes(b"")
    assert resume_point(tmp_path / "run") == checkpoints / "step_000010"
    assert resume_point(checkpoints / "step_000002") == checkpoints / "step_000002"  # a checkpoint is itself
    (checkpoints / "final").mkdir()
    (checkpoints / "final" / TRAINER_STATE).write_bytes(b"")
    assert resume_point(tmp_path / "run") == checkpoints / "final"


def test_resume_refuses_another_stages_checkpoint_and_changed_training_keys(tmp_path):
    """Before: DPO resumed from an SFT checkpoint died with `KeyError: 'ref_train'`, and a changed stage.lr
    silently kept the old schedule while MLflow recorded the new value."""
    from rlhf_exp.errors import ConfigError

    run(tiny_config(tmp_path / "sft", "stage.max_steps=1", "stage.num_samples=0", "stage.lr=1e-3"))
    _, [sft] = mlflow_runs(tmp_path / "sft" / "mlflow.db")
    folder = sft.data.tags["checkpoint_dir"]
    with pytest.raises(ConfigError, match=rf"stage=sft, and this run is stage=dpo: .*model.init_from={folder}"):
        run(tiny_config(tmp_path / "dpo", "stage=dpo", *PAIRS, f"stage.resume_from={folder}"))
    with pytest.raises(ConfigError) as refused:
        run(tiny_config(tmp_path / "lr", "stage.max_steps=2", "stage.lr=2e-3", "seed=7", f"stage.resume_from={folder}"))
    assert refused.value.key == "stage.resume_from"
    assert "stage.lr: 0.001 -> 0.002" in str(refused.value) and "seed: 42 -> 7" in str(refused.value)
    assert "stage.max_steps" not in str(refused.value).split("cannot change:")[1].split(". Resume")[0]
    # what may change does: two more steps, more held-out examples
    run(tiny_config(tmp_path / "more", "stage.max_steps=3", "stage.num_samples=0", "stage.lr=1e-3",
                    "stage.eval_examples=4", f"stage.resume_from={folder}"))
    client, [more] = mlflow_runs(tmp_path / "more" / "mlflow.db")
    assert sorted(m.step for m in client.get_metric_history(more.info.run_id, "train/loss")) == [2, 3]
