"""Precision chosen by the hardware, fp32 master weights under bf16, the fp16 scaler, and bf16 end to end."""

from __future__ import annotations

import math
import platform

import pytest
import torch

from helpers import PPO, mlflow_runs, tiny_config, trainer_for
from rlhf_exp.launch.run import run
from rlhf_exp.runtime import choose_precision
from rlhf_exp.stages.sft import SFTTrainer


def cpu_with(monkeypatch, *, avx512_bf16=False, amx=False, machine="x86_64", probe_says_bf16=None):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    import rlhf_exp.runtime as runtime

    def probe():
        assert probe_says_bf16 is not None, "the probe must not run where the CPU flags decide"
        return probe_says_bf16

    monkeypatch.setattr(runtime, "bf16_matmul_is_faster", probe)


@pytest.mark.parametrize(("cpu", "expected"), [
    (dict(), "fp32"),                                            # AVX2 only (this EPYC): bf16 is emulated
    (dict(avx512_bf16=True), "bf16"),                            # AVX512-BF16 (Cooper Lake, Zen 4)
    (dict(amx=True), "bf16"),                                    # AMX tiles (Sapphire Rapids)
    (dict(machine="aarch64", probe_says_bf16=True), "bf16"),     # no x86 flags to read: measured
    (dict(machine="aarch64", probe_says_bf16=False), "fp32"),
])
def test_auto_precision_on_a_cpu_follows_what_the_cpu_can_do(monkeypatch, cpu, expected):
    cpu_with(monkeypatch, **cpu)
    precision, reason = choose_precision("auto", "cpu")
    assert precision == expected and reason


@pytest.mark.parametrize(("bf16_supported", "expected"), [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_a_gpu_is_bf16_where_supported_else_fp16(monkeypatch, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100" if not bf16_supported else "H100")
    assert choose_precision("auto", "cuda")[0] == expected


def test_an_explicit_precision_is_kept_whatever_the_cpu(monkeypatch):
    cpu_with(monkeypatch)
    assert choose_precision("bf16", "cpu")[0] == "bf16"
    cpu_with(monkeypatch, avx512_bf16=True)
    assert choose_precision("fp32", "cpu")[0] == "fp32"


def test_a_run_records_the_precision_it_chose_and_why(tmp_path, monkeypatch):
    cpu_with(monkeypatch)  # a CPU without native bf16 (whatever runs the tests)
    run(tiny_config(tmp_path, "hardware.precision=auto", "stage.max_steps=1", "stage.num_samples=0"))
    _, runs = mlflow_runs(tmp_path / "mlflow.db")
    tags, params = runs[0].data.tags, runs[0].data.params
    assert tags["precision"] == "fp32" and "AVX512" in tags["precision_reason"]
    assert params["hardware.precision"] == "fp32"  # the params show what ran, not "auto"


def test_the_default_cpu_profile_asks_for_auto_precision():
    from rlhf_exp.config import compose_config

    assert compose_config(["hardware=cpu"]).hardware.precision == "auto"
    assert compose_config([]).hardware.precision == "auto"


def trainable(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_a_bf16_loaded_model_moves_every_trainable_tensor_at_lr_1e5(tmp_path):
    """bf16(0.02) + 1e-5 == 0.02: without fp32 master weights most of a bf16 model never moves."""
    trainer = trainer_for(SFTTrainer, tmp_path, "model.dtype=bfloat16", "hardware.precision=bf16", "stage.lr=1e-5",
                          "stage.warmup_steps=0", "stage.num_samples=0")
    before = trainable(trainer.model)
    trainer.train_step()
    after = trainable(trainer.model)
    # every element has a gradient (tied embeddings: every row feeds the LM head); Adam moves each by ~lr
    moved = {k: (before[k] != after[k]).float().mean().item() for k in before}
    stuck = {k: f"{v:.0%}" for k, v in moved.items() if v < 0.9}
    assert not stuck, f"tensors with under 90% of their weights moved: {stuck}"


def test_the_ppo_ema_of_a_bf16_loaded_policy_follows_the_policy(tmp_path):
    """EMA lerp_ with weight 1 - 0.992 is below bf16's resolution: an EMA kept in bf16 never moves."""
    from rlhf_exp.stages.ppo import PPOTrainer

    trainer = trainer_for(PPOTrainer, tmp_path, *PPO, "model.dtype=bfloat16", "stage.ema_decay=0.992")
    before = {k: v.detach().float().clone() for k, v in trainer.ema.named_parameters()}
    trainer.train_step()
    after = {k: v.detach().float() for k, v in trainer.ema.named_parameters()}
    stuck = [k for k in before if torch.equal(before[k], after[k])]
    assert not stuck, f"{len(stuck)} of {len(before)} EMA tensors did not move"


def test_sft_end_to_end_under_bf16_autocast(tmp_path):
    metrics = run(tiny_config(tmp_path, "hardware.precision=bf16", "stage.max_steps=3", "stage.lr=1e-3",
                              "stage.eval_every=3", "stage.num_samples=1"))
    client, runs = mlflow_runs(tmp_path / "mlflow.db")
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["precision"] == "bf16"
    evals = [m.value for m in client.get_metric_history(runs[0].info.run_id, "eval/loss")]
    assert math.isfinite(metrics["train/loss"]) and evals[-1] < evals[0]


def test_fp16_trains_with_a_gradient_scaler_and_resumes_it(tmp_path):
    """A GPU without bf16 (V100, T4) trains in fp16 autocast; the loss is scaled so small gradients survive."""
    common = ["hardware.precision=fp16", "stage.lr=1e-3", "stage.max_steps=4", "stage.num_samples=0",
              "stage.eval_every=null"]
    metrics = run(tiny_config(tmp_path / "a", *common, "stage.save_every=2"))
    assert metrics["train/grad_scale"] > 1 and math.isfinite(metrics["train/loss"])
    client, runs = mlflow_runs(tmp_path / "a" / "mlflow.db")
    evals = [m.value for m in client.get_metric_history(runs[0].info.run_id, "eval/loss")]
    assert evals[-1] < evals[0]
    from pathlib import Path

    step2 = Path(runs[0].data.tags["run_dir"]) / "checkpoints" / "step_000002"
    assert "scaler" in torch.load(step2 / "trainer_state.pt", weights_only=False)["engine"]
    resumed = run(tiny_config(tmp_path / "b", *common, f"stage.resume_from={step2}"))
    assert resumed["train/loss"] == pytest.approx(metrics["train/loss"], rel=1e-5)


def test_dpo_and_grpo_losses_under_bf16_autocast_agree_with_fp32(tmp_path):
    """What the bf16 default on CPUs with native bf16 (and every bf16 GPU) trains on, against fp32 on the
    same batch and weights. Stated tolerances: summed response log-probs within 1% (bf16 keeps ~3
    significant digits), a DPO loss against a shifted reference within 0.01, GRPO's per-token log-probs
    of a packed rollout within 0.05. Catches a path that drops autocast, or a mask or head that breaks
    under bf16 (NaN, -inf, or a different dtype's mask)."""
    from helpers import GRPO, PAIRS
    from rlhf_exp.data.collate import TokenizedSFT
    from rlhf_exp.stages.dpo import DPOTrainer
    from rlhf_exp.stages.grpo import GRPOTrainer

    sums, losses, grpo = {}, {}, {}
    for precision in ("fp32", "bf16"):
        dpo = trainer_for(DPOTrainer, tmp_path / f"dpo_{precision}", "stage=dpo", *PAIRS,
                          f"hardware.precision={precision}", "stage.precompute_ref_logps=false")
        pairs = [dpo.train_set[i] for i in range(4)]
        with torch.no_grad():
            chosen, rejected, lengths = dpo.pair_logps(dpo.model, pairs)
        sums[precision] = torch.stack([chosen, rejected])
        shifted = torch.tensor([3.0, 5.0, 4.0, 6.0])  # a reference away from the policy: a loss off log 2
        losses[precision] = dpo._losses(chosen, rejected, chosen + shifted, rejected - shifted,
                                        lengths.view(2, -1).T)[0].mean()
        online = trainer_for(GRPOTrainer, tmp_path / f"grpo_{precision}", *GRPO, f"hardware.precision={precision}")
        prompt = online.train_set[0].prompt_ids
        items = [TokenizedSFT(prompt, [100 + k, 200 + k, 300 + k, 2]) for k in range(3)]
        with torch.no_grad():
            grpo[precision] = online.logprobs(online.model, items)[0]
    assert torch.isfinite(sums["bf16"]).all() and torch.isfinite(grpo["bf16"]).all()
    torch.testing.assert_close(sums["bf16"], sums["fp32"], rtol=0.01, atol=0.0)
    assert abs(float(losses["bf16"]) - float(losses["fp32"])) < 0.01 and abs(float(losses["fp32"]) - math.log(2)) > 0.1
    torch.testing.assert_close(grpo["bf16"], grpo["fp32"], atol=0.05, rtol=0.0)
