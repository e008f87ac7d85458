"""The CUDA paths, exercised on a CPU: the same code and dtypes, a stand-in only where the device itself is the
point (an NCCL group, a GPU's name and memory). Each test names the fault it would catch."""

from __future__ import annotations

import types

import pytest
import torch

from rlhf_exp import distributed
from rlhf_exp.gpu_check import held_as  # the planner's terms, read off a built model


class Recorded(Exception):
    """Raised by a stand-in collective once it has seen what it was handed."""


@pytest.fixture
def nccl_group(monkeypatch):
    """A two-rank NCCL group as the helpers see it: world size 2, the backend's name, a current GPU 0.
    `devices` collects the device of every tensor handed to `all_reduce`, which then stops the call."""
    devices = []

    def all_reduce(tensor, op=None):
        devices.append(tensor.device)
        raise Recorded

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return devices


def test_collectives_under_nccl_take_tensors_on_the_gpu(nccl_group):
    """An NCCL group has no CPU backend: `sum_values` once handed `all_reduce` a CPU tensor, which killed
    every multi-GPU run at its first step."""
    assert distributed.collective_device() == torch.device("cuda", 0)


def test_sum_values_hands_all_reduce_a_tensor_on_the_groups_device(nccl_group, monkeypatch):
    monkeypatch.setattr(distributed, "collective_device", lambda: torch.device("meta"))  # a device that is not the CPU
    with pytest.raises(Recorded):
        distributed.sum_values({"loss": 1.0, "tokens": 3.0})
    assert nccl_group == [torch.device("meta")]


def test_the_sharded_grad_norm_is_reduced_on_the_groups_device(nccl_group, monkeypatch):
    """FSDP's squared-norm accumulator was a CPU float64 tensor handed to `all_reduce`."""
    class Shard:  # a DTensor parameter or gradient, as clip_grad_norm reads them
        def __init__(self, local=None, grad=None):
            self.local, self.grad = local, grad

        def to_local(self):
            return self.local

    class Replicated:
        grad = torch.ones(2)

    monkeypatch.setattr(distributed, "DTensor", Shard)
    monkeypatch.setattr(distributed, "collective_device", lambda: torch.device("meta"))
    with pytest.raises(Recorded):
        distributed.clip_grad_norm([Shard(grad=Shard(torch.ones(3))), Replicated()], 1.0)
    assert nccl_group == [torch.device("meta")]


def test_gloo_keeps_collectives_on_the_cpu(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: "gloo")
    assert distributed.collective_device() == torch.device("cpu")


# ------------------------------------------------------------------ what the planner counts is what is built
@pytest.fixture(scope="module")
def reward_model_folder(tmp_path_factory):
    """A tiny reward model as stage=rm saves it."""
    from helpers import tiny_config
    from rlhf_exp.config import resolved
    from rlhf_exp.models import load_causal_lm, load_tokenizer
    from rlhf_exp.models.reward import reward_model_from_causal_lm

    folder = tmp_path_factory.mktemp("rm")
    cfg = resolved(tiny_config(folder))
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    reward_model_from_causal_lm(load_causal_lm(cfg.model, cfg.paths.cache_dir, tokenizer)).save_pretrained(folder / "rm")
    tokenizer.save_pretrained(folder / "rm")
    return folder / "rm"


QLORA = ["hardware.lora.enabled=true", "hardware.lora.r=4", "hardware.load_in_4bit=true"]


@pytest.mark.parametrize("hardware", [QLORA, QLORA[:2], []], ids=["qlora", "lora", "full"])
def test_the_plan_holds_every_model_as_the_stage_builds_it(tmp_path, reward_model_folder, hardware):
    """PPO with a reward model in bf16 (the RTX 4090 seed's shape at a tiny size): the RM and the critic were
    loaded in fp32 and never in 4-bit while the plan assumed otherwise, so a 7B pipeline planned at 141%."""
    from helpers import PPO, trainer_for
    from rlhf_exp.planner import plan_run
    from rlhf_exp.stages.ppo import PPOTrainer

    overrides = [a for a in PPO if not a.startswith(("reward.", "~reward.", "allowed_targets"))]
    overrides += ["reward=reward_model", f"reward.fn.path={reward_model_folder}", "model.dtype=bfloat16",
                  "hardware.precision=bf16", *hardware]
    trainer = trainer_for(PPOTrainer, tmp_path, *overrides)
    built = {"policy": trainer.policy, "reward model": trainer.rewards.reward_model, "critic": trainer.model.critic}
    if not hardware:  # full fine-tuning: a frozen reference, and rollouts from a bf16 copy of the fp32 masters
        built["reference"] = trainer.reference
        built["sampling copy"] = trainer.sampling_policy()
    plan = plan_run(trainer.cfg)
    assert {role: held_as(model) for role, model in built.items()} == {role: plan.held[role] for role in built}
    assert set(plan.held) == set(built)
    for head in (trainer.rewards.reward_model.head, trainer.model.critic.head):
        assert head.weight.dtype == torch.float32  # a score read in bf16 loses its low bits
    trainer.close()


# ------------------------------------------------------------------ hardware=auto
@pytest.fixture
def a_gpu(monkeypatch):
    """torch seeing one GPU of a given name and memory (GiB total, GiB free)."""
    def install(name: str, total_gib: float, free_gib: float):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_gib * 2**30, total_gib * 2**30))
    return install


@pytest.mark.parametrize(("name", "total", "free", "profile"), [
    ("NVIDIA L40S", 44.4, 44.0, "h100"), ("NVIDIA H200", 139.8, 139.0, "h100"),
    ("NVIDIA GeForce RTX 4080", 15.6, 15.0, "rtx4090"), ("NVIDIA GB10", 119.7, 110.0, "dgx_spark")])
def test_hardware_auto_plans_against_the_memory_the_card_has(a_gpu, name, total, free, profile):
    """Every GPU of 40 GiB or more was planned as an 80 GB H100 (an L40S was told "fits"), a 16 GB card as 24 GB."""
    from rlhf_exp.config import AUTO_CHOICE, resolve_auto_hardware

    a_gpu(name, total, free)
    assert resolve_auto_hardware(["stage=dpo"]) == ["stage=dpo", f"hardware={profile}", f"hardware.memory_gb={free:.1f}"]
    assert name in AUTO_CHOICE[0] and f"{free:.1f} GiB free" in AUTO_CHOICE[0]
    assert resolve_auto_hardware(["hardware.memory_gb=20"]) == ["hardware.memory_gb=20", f"hardware={profile}"]


def test_a_gpu_torch_cannot_use_stops_hardware_auto_naming_the_fix(monkeypatch):
    """A torch built for a newer CUDA than the driver sees no GPU, and auto quietly trained a 7B model on the CPU."""
    from rlhf_exp import config
    from rlhf_exp.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(config, "gpu_present", lambda: "nvidia-smi -L: GPU 0: NVIDIA H100 80GB HBM3")
    with pytest.raises(ConfigError, match=r"hardware.*GPU is present.*H100.*cannot use it.*hardware=cpu"):
        config.resolve_auto_hardware(["stage=sft"])
    assert config.resolve_auto_hardware(["hardware=cpu"]) == ["hardware=cpu"]  # chosen knowingly


def test_no_gpu_here_is_what_this_machine_reports():
    """On a machine without a driver (CI), nvidia-smi's own failure message is not a GPU."""
    from rlhf_exp.config import gpu_present

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU torch can use")
    assert gpu_present() is None


# ------------------------------------------------------------------ attention
def test_flash_attention_only_where_it_imports_and_has_kernels(monkeypatch):
    """A flash-attn wheel built for another torch was "found" and failed at load; the GB10 has no FA2 kernels."""
    import builtins
    import importlib.util

    from rlhf_exp.config import best_attention

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else None)
    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "flash_attn":
            raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    assert best_attention() == "sdpa"
    monkeypatch.setattr(builtins, "__import__", real_import)
    import sys
    import types

    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    for capability, expected in (((12, 1), "sdpa"), ((7, 5), "sdpa"), ((9, 0), "flash_attention_2"),
                                 ((8, 6), "flash_attention_2")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert best_attention() == expected, capability


def test_a_gated_model_stops_with_one_line_naming_hf_token(monkeypatch):
    """Llama-2 and Mistral are gated: without a token the hub's refusal came back as a generic load failure."""
    from transformers import AutoTokenizer

    from rlhf_exp.config import compose_config
    from rlhf_exp.errors import ConfigError
    from rlhf_exp.models import load_tokenizer

    def refuse(*args, **kwargs):
        raise OSError("You are trying to access a gated repo.\nMake sure to have access to it at "
                      "the model's page.\n401 Client Error.")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)
    cfg = compose_config(["model=llama2_7b"])
    with pytest.raises(ConfigError) as caught:
        load_tokenizer(cfg.model, cfg.paths.cache_dir)
    assert "HF_TOKEN" in str(caught.value) and "meta-llama/Llama-2-7b-hf" in str(caught.value)
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------ LoRA merges out of place
def bf16_lora_model(tmp_path):
    """A tiny causal LM with a bf16 base and fp32 adapters whose B is not zero (merged weights differ)."""
    from helpers import LORA, tiny_config
    from rlhf_exp.config import resolved
    from rlhf_exp.models import load_causal_lm, load_tokenizer
    from rlhf_exp.models.loading import upcast_trainable

    cfg = resolved(tiny_config(tmp_path, *LORA, "model.dtype=bfloat16"))
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    model = upcast_trainable(load_causal_lm(cfg.model, cfg.paths.cache_dir, tokenizer, cfg.hardware))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model, tokenizer


def test_vllm_weight_syncs_merge_out_of_place_and_never_move_the_lora_base(tmp_path):
    """merge_adapter() / unmerge_adapter() in place at every sync rounded the bf16 base (which under LoRA is also
    the KL reference) a little further each time (trl#6688); 100 syncs now leave it bit-identical, and what the
    engine receives is the merged weight, rounded once."""
    from peft.tuners.lora import LoraLayer

    from rlhf_exp.rollout.vllm_engine import VLLMRollouts

    model, tokenizer = bf16_lora_model(tmp_path)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    assert any(p.dtype == torch.bfloat16 for p in base.values())
    received = {}
    engine = VLLMRollouts.__new__(VLLMRollouts)
    engine.sleep_mode, engine.synced_at = False, 0
    engine.llm = types.SimpleNamespace(
        llm_engine=types.SimpleNamespace(model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(
            model_runner=types.SimpleNamespace(model=types.SimpleNamespace(
                load_weights=lambda pairs: received.update((n, t.clone()) for n, t in pairs)))))),
        reset_prefix_cache=lambda: None)
    for step in range(1, 101):
        engine.sync(model, tokenizer, step)
    for name, param in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base[name]), f"{name} moved"
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert layers
    for name, layer in layers.items():
        plain = name.removeprefix("base_model.model.") + ".weight"
        weight = layer.base_layer.weight
        exact = (weight.float() + layer.get_delta_weight("default").float()).to(weight.dtype)
        assert torch.equal(received[plain], exact), plain
    # and what peft's own merge gives (it rounds the delta to bf16 before adding: within one bf16 step)
    model.merge_adapter()
    try:
        for name, layer in layers.items():
            plain = name.removeprefix("base_model.model.") + ".weight"
            assert torch.allclose(received[plain].float(), layer.base_layer.weight.float(), rtol=2**-7, atol=1e-6)
    finally:
        model.unmerge_adapter()


def test_a_merged_save_is_built_on_the_host_and_leaves_the_model_untouched(tmp_path):
    """Merged saves deep-copied the whole model on its device (+14.5 GiB for Mistral-7B on the GPU, unplanned)."""
    from rlhf_exp.models.peft import is_peft, merged_float_copy, merged_weights

    model, _ = bf16_lora_model(tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merged = merged_float_copy(model, lambda: pytest.fail("a float base is not rebuilt"), None)
    assert not is_peft(merged)
    assert all(p.device.type == "cpu" and not p.requires_grad for p in merged.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    expected = dict(merged_weights(model))
    assert {n: p for n, p in merged.named_parameters()}.keys() <= expected.keys()
    for name, param in merged.named_parameters():
        assert torch.equal(param, expected[name]), name
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, model(input_ids=ids).logits, atol=0.05)


# ------------------------------------------------------------------ attention kernels of a training step
@pytest.mark.parametrize("stage", ["dpo", "grpo"])
def test_training_steps_keep_cudnn_attention_out_of_packed_forwards_and_their_recomputation(tmp_path, stage,
                                                                                           monkeypatch):
    """cuDNN SDPA returns NaN gradients under explicit masks on Hopper (pytorch#196678, trl#7181): every SDPA call
    of a packed DPO or GRPO step (the forward, and with gradient checkpointing the recomputation in backward) runs
    with cuDNN attention switched off, and the default kernel set is back after the step."""
    import transformers.integrations.sdpa_attention as sdpa_module

    from helpers import GRPO, PAIRS, trainer_for
    from rlhf_exp.stages.dpo import DPOTrainer
    from rlhf_exp.stages.grpo import GRPOTrainer

    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((torch.backends.cuda.cudnn_sdp_enabled(), kwargs.get("attn_mask") is not None
                      and kwargs["attn_mask"].dim() == 4, torch.is_grad_enabled()))
        return real(*args, **kwargs)

    overrides = {"dpo": ["stage=dpo", *PAIRS, "hardware.micro_batch_size.dpo=2", "stage.precompute_ref_logps=false"],
                 "grpo": [*GRPO, "hardware.micro_batch_size.grpo=8"]}[stage]
    trainer = trainer_for({"dpo": DPOTrainer, "grpo": GRPOTrainer}[stage], tmp_path, *overrides,
                          "hardware.gradient_checkpointing=true", "model.attn_implementation=sdpa")
    monkeypatch.setattr(sdpa_module.torch.nn.functional, "scaled_dot_product_attention", spy)
    calls.clear()
    trainer.checked(trainer.train_step)
    trained = [c for c in calls if c[1] and c[2]]  # masked calls with gradients: the training forwards
    assert trained, "no packed forward was seen"
    assert not any(cudnn for cudnn, _, _ in calls if _), "cuDNN attention was allowed under a packed mask"
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after the step
    trainer.close()


# ------------------------------------------------------------------ TF32, 8-bit states, the weights' hash
def test_tf32_is_on_for_fp32_matmuls_on_ampere_and_later_only(monkeypatch):
    from rlhf_exp.runtime import allow_tf32

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert not allow_tf32(torch.device("cpu")) and torch.get_float32_matmul_precision() == "highest"
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4
        assert not allow_tf32(torch.device("cuda")) and torch.get_float32_matmul_precision() == "highest"
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
        assert allow_tf32(torch.device("cuda")) and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_8bit_adam_keeps_32bit_states_for_the_embeddings_and_tied_head(tmp_path):
    """As the HF Trainer does: blockwise 8-bit moments of the (sparse, uneven) embedding updates destabilize training."""
    from helpers import trainer_for
    from rlhf_exp.stages.sft import SFTTrainer

    trainer = trainer_for(SFTTrainer, tmp_path, "hardware.optimizer=adamw_8bit", "model.config.hidden_size=128",
                          "model.config.intermediate_size=256")
    trainer.train_step()
    model = trainer.model
    embedding = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embedding  # the tiny model ties its head
    state = trainer.optimizer.state[embedding]
    assert state["state1"].dtype == torch.float32
    linear = model.model.layers[0].mlp.up_proj.weight
    assert trainer.optimizer.state[linear]["state1"].dtype == torch.uint8  # the rest stays 8-bit
    trainer.close()


def test_the_weights_hash_is_streamed_a_tensor_at_a_time():
    """It held a host copy of every weight at once (14.5 GB for Mistral-7B) before hashing; its value is unchanged."""
    import tracemalloc

    from rlhf_exp.data.disk_cache import digest, weights_hash

    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512, bias=False) for _ in range(8)])  # 8 x 1 MiB
    whole = []
    for name, tensor in model.state_dict().items():
        whole += [f"{name}:{tensor.dtype}:{tuple(tensor.shape)}", tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()]
    tracemalloc.start()
    try:
        value = weights_hash(model)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert value == digest(whole)
    assert peak < 2 * 2**20, f"{peak / 2**20:.1f} MiB held while hashing 8 MiB of weights"


# ------------------------------------------------------------------ precision of frozen models and heads
def test_log_probs_come_from_fp32_logits_under_bf16_autocast():
    """The LM head ran inside autocast: bf16 logits, a logit of 20 rounded to 1/8, then log-softmax."""
    from rlhf_exp.ops.logprobs import head_logprobs

    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(64, 1000, bias=False)
    model = types.SimpleNamespace(get_output_embeddings=lambda: head)
    hidden = torch.randn(12, 64, generator=generator).to(torch.bfloat16) * 8
    targets = torch.randint(0, 1000, (12,), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        picked, _ = head_logprobs(model, hidden, targets)
    expected = torch.log_softmax(hidden.float() @ head.weight.T, -1).gather(-1, targets[:, None]).squeeze(-1)
    assert picked.dtype == torch.float32
    assert torch.allclose(picked, expected, atol=1e-5, rtol=0)


def test_reward_and_value_heads_read_fp32_scores_under_bf16_autocast():
    from rlhf_exp.models.reward import RewardModel

    model = RewardModel(torch.nn.Identity(), 64)
    hidden = torch.randn(5, 64, generator=torch.Generator().manual_seed(1)) * 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model.score(hidden)
    assert scores.dtype == torch.float32
    assert torch.allclose(scores, (hidden @ model.head.weight.T).squeeze(-1), atol=1e-5, rtol=0)


def test_the_frozen_reference_computes_as_the_policy_does_and_its_kl_starts_at_zero(tmp_path):
    """The reference was a copy in model.dtype (fp32 weights re-cast at every forward, and never cached: frozen;
    a bf16 model on an fp32 CPU run computed in emulated bf16). Then a copy all in bf16 beside fp32 master weights
    ran its residual stream in bf16, the policy's in fp32: their log-probs differed before any update (a KL
    floor, 0.0018 nats at most on this tiny model). Now its linear layers are bf16 (what autocast feeds the
    policy's matmuls) and the rest fp32 as the policy's: identical log-probs at step 0."""
    from helpers import GRPO, trainer_for
    from rlhf_exp.data.collate import TokenizedSFT
    from rlhf_exp.planner import plan_run
    from rlhf_exp.stages.grpo import GRPOTrainer

    trainer = trainer_for(GRPOTrainer, tmp_path, *GRPO, "hardware.precision=bf16")
    reference = trainer.reference
    assert reference.get_output_embeddings().weight.dtype == torch.float32
    linear = {p.dtype for n, p in reference.named_parameters() if n.endswith("proj.weight")}
    assert linear == {torch.bfloat16}
    plan = plan_run(trainer.cfg)
    assert plan.held["reference"] == held_as(reference) == {"linear": 2, "rest": 4}
    prompts = [trainer.train_set[i].prompt_ids for i in range(2)]
    items = [TokenizedSFT(p, r) for p, r in zip([prompts[0]] * 2 + [prompts[1]] * 2, trainer.sample(prompts, 2))]
    policy, ref = trainer.rollout_logprobs(trainer.policy, items), trainer.rollout_logprobs(reference, items)
    assert torch.equal(policy, ref), float((policy - ref).abs().max())
    trainer.close()


# ------------------------------------------------------------------ sampling from a compute-dtype copy
class WeightCasts(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts fp32 -> 16-bit casts of tensors at least `size` elements large (weights, not activations)."""

    def __init__(self, size: int):
        super().__init__()
        self.size, self.count = size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32 \
                and kwargs.get("dtype") in (torch.bfloat16, torch.float16) and args[0].numel() >= self.size:
            self.count += 1
        return func(*args, **kwargs)


def test_rollouts_sample_from_a_compute_dtype_copy_refreshed_after_each_update(tmp_path):
    """With fp32 master weights under bf16 autocast every decode step cast every weight again (measured here on a
    CPU in bf16, where the same happens): the sampler now decodes with a bf16 copy that no step casts, made equal
    to the policy again after each optimizer step."""
    from helpers import GRPO, VARIED, trainer_for
    from rlhf_exp.planner import plan_run
    from rlhf_exp.stages.grpo import GRPOTrainer

    trainer = trainer_for(GRPOTrainer, tmp_path, *GRPO, *VARIED, "hardware.precision=bf16",
                          "stage.generation.max_new_tokens=4")
    prompts = [trainer.train_set[0].prompt_ids]
    weight_size = 64 * 64
    with WeightCasts(weight_size) as casts:
        trainer.sample(prompts, 2)
    first = casts.count  # the copy is made here: one cast per weight, once
    with WeightCasts(weight_size) as casts:
        trainer.sample(prompts, 2)
    assert first > 0 and casts.count == 0, f"{casts.count} weight casts in a rollout from an unchanged policy"

    kept = trainer.sampling_policy()
    trainer.train_step()  # an update
    policy = dict(trainer.policy.named_parameters())
    assert any(not torch.equal(p, policy[n].to(torch.bfloat16)) for n, p in kept.named_parameters())  # stale
    refreshed = trainer.sampling_policy()
    assert refreshed is kept
    for name, param in refreshed.named_parameters():
        assert param.dtype == torch.bfloat16 and torch.equal(param, policy[name].to(torch.bfloat16)), name
    assert plan_run(trainer.cfg).held["sampling copy"] == held_as(refreshed)
    trainer.close()


# ------------------------------------------------------------------ gradient checkpointing with LoRA
@pytest.mark.parametrize("path", ["policy", "reward model"])
def test_gradient_checkpointing_with_lora_gives_the_adapters_the_same_gradients(tmp_path, path):
    """With frozen embeddings no input of a checkpointed layer requires grad: reentrant checkpointing then passes
    no gradient to the adapters, silently. The RM path (adapters on the backbone, a scalar head) and the policy
    path (a PeftModel causal LM) each get the gradients they get without checkpointing."""
    from helpers import LORA, tiny_config
    from rlhf_exp.config import resolved
    from rlhf_exp.models import enable_activation_checkpointing, load_causal_lm, load_tokenizer
    from rlhf_exp.models.reward import add_reward_adapters
    from rlhf_exp.models.reward import reward_model_from_causal_lm

    cfg = resolved(tiny_config(tmp_path, *LORA))
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    ids = torch.tensor([[5, 9, 11, 13, 17, 19, 23, 29], [31, 37, 41, 43, 47, 53, 59, 61]])

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)  # the same adapters (A is drawn from the global stream) and head both times
        if path == "policy":
            model = load_causal_lm(cfg.model, cfg.paths.cache_dir, tokenizer, cfg.hardware)
        else:
            model = add_reward_adapters(reward_model_from_causal_lm(
                load_causal_lm(cfg.model, cfg.paths.cache_dir, tokenizer)), cfg.hardware)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        if checkpointing:
            enable_activation_checkpointing(model)
        model.train()
        out = model(input_ids=ids).logits.float().logsumexp(-1).sum() if path == "policy" else \
            model(ids, torch.tensor([8, 6])).sum()
        out.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain and plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(checkpointed[name], grad, atol=1e-6, rtol=1e-4), name
