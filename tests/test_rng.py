"""Random streams: rollouts draw from the run's own generator; evaluating never moves a training stream."""

from __future__ import annotations


import pytest
import torch

from helpers import GRPO, VARIED, mlflow_runs, tiny_config, trainer_for
from rlhf_exp.launch.run import run
from rlhf_exp.stages.grpo import GRPOTrainer
from rlhf_exp.stages.sft import SFTTrainer


def test_rollouts_come_from_the_runs_own_generator_not_the_global_stream(tmp_path):
    """On a GPU an evaluation reseeded every CUDA generator, so the next rollouts depended on when the run
    evaluated. Whatever else draws from or reseeds the global streams, a run's rollouts stay its own."""
    first = trainer_for(GRPOTrainer, tmp_path / "a", *GRPO, *VARIED, "stage.minibatch_size=8").train_step()
    second_trainer = trainer_for(GRPOTrainer, tmp_path / "b", *GRPO, *VARIED, "stage.minibatch_size=8")
    torch.manual_seed(12345)  # what the old evaluation did to every CUDA generator
    torch.rand(1000)
    second = second_trainer.train_step()
    for key in ("train/reward_mean", "train/response_length", "train/loss", "train/kl_k3"):
        assert second[key] == first[key], key


@pytest.mark.parametrize(("cls", "overrides"), [(GRPOTrainer, [*GRPO, *VARIED, "stage.minibatch_size=8"]), (SFTTrainer, ["stage.num_samples=2"])],
                         ids=["grpo", "sft"])
def test_an_evaluation_leaves_every_random_stream_as_it_found_it(tmp_path, cls, overrides):
    trainer = trainer_for(cls, tmp_path, *overrides)
    trainer.train_step()
    before = (torch.get_rng_state(), trainer.random.state_dict())
    trainer.evaluate()
    after = (torch.get_rng_state(), trainer.random.state_dict())
    assert torch.equal(before[0], after[0])
    assert before[1].keys() == after[1].keys() and before[1]
    for name in before[1]:
        assert torch.equal(before[1][name], after[1][name]), name


def train_history(tmp_path, *overrides) -> dict[str, list[float]]:
    run(tiny_config(tmp_path, *GRPO, *VARIED, "stage.max_steps=3", "stage.minibatch_size=4",
                    "hardware.micro_batch_size.grpo=4", *overrides))
    client, runs = mlflow_runs(tmp_path / "mlflow.db")
    run_id = runs[0].info.run_id
    names = [k for k in runs[0].data.metrics if k.startswith("train/") and k != "train/lr"]
    return {k: [m.value for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)] for k in names}


def test_grpo_training_does_not_depend_on_how_often_it_evaluates(tmp_path):
    often = train_history(tmp_path / "often", "stage.eval_every=1")
    never = train_history(tmp_path / "never", "stage.eval_every=null")
    assert often.keys() == never.keys() and "train/reward_mean" in often
    for key in often:
        assert often[key] == never[key], key
