"""Two CPU processes under torchrun (gloo): replicas stay identical, match one process with the same
global batch, and a two-rank run SIGKILLed mid-run resumes to the uninterrupted run's weights, bit for
bit (SFT, DPO, RM and GRPO on the tiny model; PPO runs in one process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import PAIRS, ROOT, TINY, mlflow_runs, run_until_killed, tiny_config, tracked_env
from rlhf_exp.launch import run as app
from rlhf_exp.config import resolved
from rlhf_exp.errors import ConfigError

STAGES = {
    "sft": ["stage=sft", "hardware.micro_batch_size.sft=1"],
    "dpo": ["stage=dpo", *PAIRS, "stage.eval_examples=8", "hardware.micro_batch_size.dpo=1"],
    # keep_best with an evaluation each step: under FSDP every rank must join the best checkpoint's gather
    "rm": ["stage=rm", *PAIRS, "stage.eval_examples=8", "stage.norm_examples=16", "hardware.micro_batch_size.rm=1",
           "stage.keep_best=true", "stage.eval_every=1"],
}


def launch(tmp_path: Path, nproc: int, overrides: list[str], launcher: str = "torchrun") -> subprocess.CompletedProcess:
    prefix = {"torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"],
              # accelerate's GPU launcher is torchrun underneath; --multi_gpu only picks it (the ranks use gloo on CPU)
              "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines=1",
                             f"--num_processes={nproc}", "--mixed_precision=no", "--dynamo_backend=no"],
              }[launcher] if nproc > 1 else [sys.executable]
    env = {**os.environ, **tracked_env(tmp_path), "OMP_NUM_THREADS": "1",  # tests/: GRPO's reward function
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([*prefix, "-m", "rlhf_exp", *TINY, *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def tracked_run(tmp_path: Path, nproc: int, overrides: list[str], launcher: str = "torchrun"):
    out = launch(tmp_path, nproc, overrides, launcher)
    assert out.returncode == 0, out.stderr[-3000:]
    client, runs = mlflow_runs(tmp_path / "m.db")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # only rank 0 tracks
    return runs[0]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process run of each stage (in this process: no start-up to pay), made once and compared
    with every parallel mode."""
    made = {}

    def get(stage: str):
        if stage not in made:
            folder = tmp_path_factory.mktemp(f"one-{stage}")
            app.run(tiny_config(folder, *common(stage)))
            made[stage] = mlflow_runs(folder / "mlflow.db")[1][0]
        return made[stage]
    return get


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The uninterrupted two-rank run of (stage, parallel), launched once: matched against one process,
    and the run a SIGKILLed copy must resume to."""
    made = {}

    def get(stage: str, parallel: str):
        if (stage, parallel) not in made:
            made[stage, parallel] = tracked_run(tmp_path_factory.mktemp(f"two-{stage}-{parallel}"), 2,
                                                [*common(stage), f"parallel={parallel}"])
        return made[stage, parallel]
    return get


def common(stage: str) -> list[str]:
    if stage == "grpo":
        return GRPO
    return [*STAGES[stage], "stage.batch_size=4", "stage.max_steps=3", "stage.num_samples=0", "stage.lr=1e-3"]


# ddp: replicas; zero1: replicas with optimizer states sharded (ZeroRedundancyOptimizer); fsdp / zero2:
# FSDP2 blocks (the RM: its own save path for the gathered state); deepspeed_*: DeepSpeed's engine
# (sft under deepspeed_zero3: the two-rank runs of the resume test below, checked the same way)
@pytest.mark.parametrize("stage,parallel", [("sft", "ddp"), ("dpo", "zero1"), ("dpo", "zero2"), ("rm", "fsdp"),
                                            ("dpo", "deepspeed_zero2")])
def test_torchrun_two_cpu_processes_match_one_process(one_process, two_processes, stage, parallel):
    assert_matches_one_process(two_processes(stage, parallel), one_process(stage), stage, parallel)


def assert_matches_one_process(two, one, stage: str, parallel: str) -> None:
    digests = two.data.tags["dist.parameter_digests"].split(",")
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks end with identical parameters
    assert two.data.metrics["dist/replicas_identical"] == 1.0
    # an RM's head is its score.weight there; GRPO trains LoRA adapters
    files = ["adapter_model.safetensors" if stage == "grpo" else "model.safetensors"]
    weights = [{f"{f}:{k}": v for f in files for k, v in load_file(str(Path(r.data.tags["checkpoint_dir"]) / f)).items()}
               for r in (two, one)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:  # a sharded run's checkpoint is written whole
        assert torch.allclose(weights[0][name], weights[1][name], atol=1e-5), name
    losses = [r.data.metrics["train/loss"] for r in (two, one)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    grad_norms = [r.data.metrics["train/grad_norm"] for r in (two, one)]
    assert grad_norms[0] == pytest.approx(grad_norms[1], rel=1e-4)
    if stage == "rm":  # the same best checkpoint, written whole
        best = [Path(r.data.tags["best_checkpoint_dir"]) for r in (two, one)]
        assert (best[0] / "best.json").read_text() == (best[1] / "best.json").read_text()
        assert torch.allclose(load_file(str(best[0] / "model.safetensors"))["score.weight"],
                              load_file(str(best[1] / "model.safetensors"))["score.weight"], atol=1e-5)
    folder = Path(two.data.tags["checkpoint_dir"])
    if parallel.startswith("deepspeed"):  # DeepSpeed's own checkpoint: one optimizer partition per rank
        assert len(list((folder / "deepspeed" / "state").glob("*optim_states.pt"))) == 2
    else:
        state = torch.load(folder / "trainer_state.pt", weights_only=False)
        assert state["engine"]["optimizer"]["state"], "the optimizer state is saved whole"


# Greedy rollouts (top_k=1) are the same whichever rank samples them, so two ranks must take the one
# process's steps exactly. A group's samples are then one text, whose group-relative advantages sum to zero:
# what trains is the KL term, which is not zero from the start because LoRA's B is drawn at random too
# (lora.init_weights=false), so the policy differs from its reference (the base, adapters disabled).
GRPO = ["stage=grpo", "reward=length", "stage.samples_per_prompt=2", "stage.minibatch_size=8",
        "hardware.lora.enabled=true", "hardware.lora.r=4", "hardware.lora.dropout=0.0", "hardware.lora.init_weights=false",
        "hardware.lora.merge_on_save=false",
        "stage.updates_per_rollout=1", "stage.generation.top_k=1", "stage.kl_estimator=k3", "stage.kl_coef=0.5",
        "stage.max_steps=2", "stage.eval_examples=4", "stage.num_samples=0", "stage.lr=1e-3",
        "hardware.micro_batch_size.grpo=2"]


def test_grpo_two_ranks_match_one_process(one_process, two_processes):
    one, two = one_process("grpo"), two_processes("grpo", "ddp")
    digests = two.data.tags["dist.parameter_digests"].split(",")
    assert digests[0] == digests[1]
    assert two.data.metrics["train/rollout_sequences"] == one.data.metrics["train/rollout_sequences"] == 8
    for name in ("train/grad_norm", "train/loss", "train/kl_k3", "train/response_length"):
        assert two.data.metrics[name] == pytest.approx(one.data.metrics[name], rel=1e-4, abs=1e-6), name
    assert one.data.metrics["train/grad_norm"] > 0  # the KL term really trained
    weights = [load_file(str(Path(r.data.tags["checkpoint_dir"]) / "adapter_model.safetensors")) for r in (two, one)]
    assert weights[0]
    for name in weights[0]:
        assert torch.allclose(weights[0][name], weights[1][name], atol=1e-5), name


@pytest.mark.parametrize("stage,parallel,launcher", [("sft", "ddp", "accelerate"), ("dpo", "zero1", "torchrun"),
                                                     ("rm", "fsdp", "torchrun"), ("grpo", "ddp", "torchrun")])
def test_two_ranks_sigkilled_mid_run_resume_to_the_uninterrupted_weights(tmp_path, two_processes, stage, parallel,
                                                                          launcher):
    """Every process of the job (torchrun and both ranks) SIGKILLed after step 2 trained and logged, past
    the step-1 checkpoint; resumed on two ranks from the run folder, it ends bit-identical to the
    uninterrupted two-rank run (sharded optimizer state, the RNG of each rank and the data position
    come back whole). SFT's resumed job is started by `accelerate launch --num_processes 2 -m rlhf_exp`:
    the same ranks, and a run folder of the job's own (accelerate's job id is "none" for every job)."""
    whole = two_processes(stage, parallel)
    args = [*TINY, *common(stage), f"parallel={parallel}"]
    folder, _ = run_until_killed(tmp_path, 2, [*args, "stage.save_every=1"], hang_at_step=2, env=tracked_env(tmp_path))
    # (the RM also keeps checkpoints/best: weights only, never what a resume picks)
    assert sorted(p.name for p in (folder / "checkpoints").iterdir() if p.name != "best") == ["step_000001"]
    resumed = tracked_run(tmp_path, 2, [*common(stage), f"parallel={parallel}", f"stage.resume_from={folder}"],
                          launcher=launcher)
    assert resumed.data.tags["resume_count"] == "1" and "SIGKILL" in resumed.data.tags["killed_note"]
    assert resumed.data.tags["dist.world_size"] == "2" and not resumed.data.tags["run_dir"].endswith("_none")
    # an RM's head is its score.weight there; GRPO trains LoRA adapters
    files = ["adapter_model.safetensors" if stage == "grpo" else "model.safetensors"]
    for name in files:
        expected, got = (load_file(str(Path(r.data.tags["checkpoint_dir"]) / name)) for r in (whole, resumed))
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{name}: {key}"
    for name in ("train/loss", "train/grad_norm"):
        assert resumed.data.metrics[name] == whole.data.metrics[name], name


@pytest.mark.parametrize("overrides,key,advice", [
    ([*common("sft"), "parallel=fsdp", "hardware.lora.enabled=true"], "parallel", "use parallel=ddp"),
    ([*common("sft"), "parallel=zero1", "hardware.optimizer=adamw_8bit"], "hardware.optimizer",
     "use hardware.optimizer=adamw"),
    ([*common("sft"), "parallel=deepspeed_zero3", "hardware.lora.enabled=true"], "parallel", "use parallel=ddp"),
    (["stage=grpo", "stage.max_steps=1", "parallel=fsdp"], "parallel", "use parallel=ddp or zero1"),
    (["stage=grpo", "stage.batch_size=3", "stage.minibatch_size=12", "hardware.micro_batch_size.grpo=4"],
     "stage.batch_size", "must divide evenly over 2 processes"),
])
def test_what_several_processes_cannot_run_is_refused_with_the_config_key(tmp_path, monkeypatch, overrides, key, advice):
    """The checks a run makes once torchrun has started its ranks, as two ranks see them (the one real
    launch is the next test)."""
    monkeypatch.setattr(app.distributed, "world_size", lambda: 2)
    with pytest.raises(ConfigError) as error:
        app.check_distributed(resolved(tiny_config(tmp_path, *overrides)))
    assert error.value.key == key and advice in str(error.value)


def test_torchrun_refuses_a_stage_that_runs_in_one_process_by_name(tmp_path):
    out = launch(tmp_path, 2, ["stage=ppo", "stage.max_steps=1"])
    assert out.returncode != 0  # torchrun reports its ranks' exit (2) as its own failure
    assert "config key `stage`" in out.stderr and "covers dpo, grpo, rm, sft" in out.stderr


def test_deepspeed_zero3_run_matches_one_process_and_resumes_from_its_checkpoint(tmp_path, one_process):
    """The two-rank run ends where one process does; stopped after step 2 and resumed, it ends with the
    uninterrupted run's weights: the checkpoint holds the gathered model, and DeepSpeed's own
    partitioned optimizer checkpoint. (FSDP's resume: the SIGKILL test above, rm-fsdp.)"""
    parallel = "deepspeed_zero3"
    full = tracked_run(tmp_path / "full", 2, [*common("sft"), f"parallel={parallel}", "stage.save_every=2"])
    assert_matches_one_process(full, one_process("sft"), "sft", parallel)
    step2 = Path(full.data.tags["run_dir"]) / "checkpoints" / "step_000002"
    assert (step2 / "trainer_state.pt").is_file()
    resumed = tracked_run(tmp_path / "resumed", 2, [*common("sft"), f"parallel={parallel}",
                                                    f"stage.resume_from={step2}"])
    weights = [load_file(str(Path(r.data.tags["checkpoint_dir"]) / "model.safetensors")) for r in (full, resumed)]
    for name in weights[0]:
        assert torch.allclose(weights[0][name], weights[1][name], atol=1e-6), name
    assert resumed.data.metrics["train/loss"] == pytest.approx(full.data.metrics["train/loss"], rel=1e-5)
