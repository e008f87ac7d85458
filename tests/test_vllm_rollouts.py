"""hardware.rollout_backend=vllm on a machine without vLLM or a GPU: the refusal, and the glue between the trainer
and the engine (the engine's start folder, the weight copy after each update, the stop token, the seeds) against a
stand-in for vLLM's `LLM` that keeps what it is given. vLLM itself runs only where the device tool lends a GPU."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from helpers import GRPO, LORA, trainer_for
from rlhf_exp.errors import ConfigError
from rlhf_exp.runtime import RandomStreams
from rlhf_exp.stages import online
from rlhf_exp.stages.toolbox import Toolbox
from rlhf_exp.stages.grpo import GRPOTrainer

VLLM = ["hardware.rollout_backend=vllm"]


def test_vllm_rollouts_are_refused_where_they_cannot_run_before_any_weights_are_read(tmp_path, monkeypatch):
    monkeypatch.setattr(Toolbox, "load_policy", lambda self: pytest.fail("weights were read before the refusal"))
    with pytest.raises(ConfigError) as info:
        trainer_for(GRPOTrainer, tmp_path, *GRPO, *VLLM, "hardware.lora.enabled=true", "hardware.load_in_4bit=true")
    message = str(info.value)
    assert "`hardware.rollout_backend`: vllm cannot run here" in message and "hardware.device is cpu" in message
    assert "hardware.load_in_4bit" in message and "rollout_backend=hf" in message
    if "vllm" not in sys.modules:
        assert "pip install vllm" in message


class FakeLLM:
    """What the trainer uses of vllm.LLM: reads the folder it is pointed at, takes weights by name (refusing names
    its model lacks, as vLLM's load_weights does), samples from the request's seed."""

    made: list["FakeLLM"] = []

    def __init__(self, model: str, **kwargs):
        self.kwargs = kwargs
        self.weights = load_file(f"{model}/model.safetensors")
        self.loads, self.resets, self.seeds, self.completions = 0, 0, [], []
        self.asleep, self.events = False, []
        runner = types.SimpleNamespace(model=types.SimpleNamespace(load_weights=self.load_weights))
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
            driver_worker=types.SimpleNamespace(model_runner=runner)))
        FakeLLM.made.append(self)

    def load_weights(self, pairs):
        assert not self.asleep or "wake:weights" in self.events[-1:], "weights written while the engine sleeps"
        for name, tensor in pairs:
            assert name in self.weights, f"vLLM's model has no weight {name}"
            self.weights[name] = tensor.clone()
        self.loads += 1

    def reset_prefix_cache(self):
        self.resets += 1

    def sleep(self, level):
        assert self.kwargs.get("enable_sleep_mode"), "sleep() on an engine started without sleep mode"
        self.asleep = True
        self.events.append(f"sleep:{level}")

    def wake_up(self, tags):
        self.events += [f"wake:{tag}" for tag in tags]
        if "kv_cache" in tags:
            self.asleep = False

    def generate(self, prompts, params, use_tqdm=True):
        assert not self.asleep, "generate() on a sleeping engine"
        assert isinstance(params, list) and len(params) == len(prompts), "one SamplingParams per request"
        outputs = []
        for params in params:
            self.seeds.append(params.seed)
            draw = torch.Generator().manual_seed(params.seed)
            completions = []
            for _ in range(params.n):
                length = int(torch.randint(1, params.max_tokens + 1, (1,), generator=draw))
                stopped = length < params.max_tokens
                # vLLM's stop_reason names the stop token; here the token itself is left out of token_ids
                completions.append(types.SimpleNamespace(
                    token_ids=torch.randint(3, 200, (length,), generator=draw).tolist(),
                    finish_reason="stop" if stopped else "length",
                    stop_reason=params.stop_token_ids[0] if stopped else None))
            self.completions += completions
            outputs.append(types.SimpleNamespace(outputs=completions))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = FakeLLM, lambda **kw: types.SimpleNamespace(**kw)
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: prompt_token_ids
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setattr(online, "require_vllm", lambda *_: None)  # a CPU stands in for the GPU here
    FakeLLM.made = []


def merged_weights(peft_model) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in copy.deepcopy(peft_model).merge_and_unload().state_dict().items()}


def assert_holds(engine: FakeLLM, expected: dict[str, torch.Tensor]) -> None:
    assert engine.weights.keys() <= expected.keys() and len(engine.weights) > 0
    for name, tensor in engine.weights.items():
        assert torch.allclose(tensor, expected[name], atol=1e-6), name


def test_grpo_samples_from_the_vllm_engine_and_copies_the_merged_policy_in_after_each_update(tmp_path, fake_vllm):
    """Catches: adapter weights or PEFT names sent to vLLM (it refuses them), rollouts from stale weights (no copy
    after an update, or a prefix cache still holding the old keys), adapters left merged into the trained policy,
    a stop token vLLM reported but left out of the response, and seeds that do not come from the run's generator."""
    trainer = trainer_for(GRPOTrainer, tmp_path, *GRPO, *LORA, *VLLM)
    with torch.no_grad():  # adapters that change the function, so merged weights differ from the base
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    before_any_update = merged_weights(trainer.model)
    lora_output = trainer.model(input_ids=torch.tensor([[5, 6, 7]])).logits

    metrics = trainer.train_step()
    engine = FakeLLM.made[-1]
    assert_holds(engine, before_any_update)  # started from the policy as it was, adapters merged
    assert engine.loads == 0 and engine.resets == 0
    assert engine.kwargs["dtype"] == "float32" and engine.kwargs["seed"] == trainer.cfg.seed  # the run's precision
    lengths = [len(c.token_ids) + (c.finish_reason == "stop") for c in engine.completions]
    assert metrics["train/response_length"] == pytest.approx(sum(lengths) / len(lengths))
    assert metrics["train/eos_rate"] == pytest.approx(
        sum(c.finish_reason == "stop" for c in engine.completions) / len(engine.completions))

    trainer.step = 1
    after_first_update = merged_weights(trainer.model)
    assert any(not torch.equal(after_first_update[n], before_any_update[n]) for n in engine.weights)
    trainer.train_step()
    assert len(FakeLLM.made) == 1 and engine.resets == 1
    assert_holds(engine, after_first_update)
    # the trained policy is back to base + adapters (a merge left in place would apply the adapters twice)
    merged_flags = [m.merged for m in trainer.model.modules() if hasattr(m, "merged") and hasattr(m, "lora_A")]
    assert merged_flags and not any(merged_flags)
    assert not torch.allclose(trainer.model(input_ids=torch.tensor([[5, 6, 7]])).logits, lora_output)  # it trained

    # each request (a prompt) has a seed of its own, drawn from the run's rollout generator: one seed per call gave
    # two equal prompts the same samples
    streams = RandomStreams(trainer.cfg.seed, torch.device("cpu"))
    prompts_per_rollout = trainer.stage.batch_size
    draws = [s for _ in range(len(engine.seeds) // prompts_per_rollout)
             for s in torch.randint(0, 2**31 - 1, (prompts_per_rollout,), generator=streams.rollout).tolist()]
    assert engine.seeds == draws and len(set(draws)) == len(draws) and len(draws) == 2 * prompts_per_rollout


def test_the_engine_sleeps_between_rollouts_and_is_torn_down_with_its_run(tmp_path, fake_vllm, monkeypatch):
    """hardware.vllm_sleep_mode: the engine releases its memory after each rollout, its weights are copied in again
    (awake) before the next one even at the same step, and a run's close() tears the engine down (vLLM's model
    parallel state and distributed environment destroyed), so a second run in this process starts its own."""
    destroyed = []
    parallel_state = types.ModuleType("vllm.distributed.parallel_state")
    parallel_state.destroy_model_parallel = lambda: destroyed.append("model_parallel")
    parallel_state.destroy_distributed_environment = lambda: destroyed.append("distributed_environment")
    monkeypatch.setitem(sys.modules, "vllm.distributed", types.ModuleType("vllm.distributed"))
    monkeypatch.setitem(sys.modules, "vllm.distributed.parallel_state", parallel_state)

    trainer = trainer_for(GRPOTrainer, tmp_path, *GRPO, *LORA, *VLLM, "hardware.vllm_sleep_mode=true")
    trainer.train_step()
    engine = FakeLLM.made[-1]
    assert engine.kwargs["enable_sleep_mode"] and engine.asleep and engine.events == ["wake:kv_cache", "sleep:2"]
    trainer.evaluate()  # the same step: the weights were released, so they are copied in again
    assert engine.loads > 0 and engine.events[2:4] == ["wake:weights", "wake:kv_cache"] and engine.asleep
    trainer.close()
    assert destroyed == ["model_parallel", "distributed_environment"]

    second = trainer_for(GRPOTrainer, tmp_path / "second", *GRPO, *LORA, *VLLM)
    second.train_step()
    assert len(FakeLLM.made) == 2 and not FakeLLM.made[-1].kwargs["enable_sleep_mode"]
    second.close()


@pytest.mark.parametrize(("installed", "refused"), [("0.18.2", True), ("0.19.1", False), ("0.24.0+cu129", False),
                                                    ("0.40.0", False)])
def test_the_vllm_version_window_is_checked_before_any_weights_load(installed, refused, caplog):
    """transformers 5 needs vLLM 0.19.1 or later; a newer release than the checked window runs with a warning."""
    from rlhf_exp.rollout.vllm_engine import VLLM_VERSIONS, vllm_version_problem

    problem = vllm_version_problem(installed)
    assert (problem is not None) == refused
    if refused:
        assert installed in problem and VLLM_VERSIONS[0] in problem
    warned = any("newer than" in r.message for r in caplog.records)
    assert warned == (installed == "0.40.0")
