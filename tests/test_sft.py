"""SFT end to end on the tiny model: it learns, it is tracked, it checkpoints (it resumes: test_resume.py)."""

from __future__ import annotations

import copy
import errno
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import mlflow_runs, tiny_config
from rlhf_exp.launch.run import resolved, run
from rlhf_exp.data.collate import collate_sft, tokenize_sft
from rlhf_exp.data.formats import SFTExample
from rlhf_exp.losses import sft_loss
from rlhf_exp.models import load_causal_lm
from rlhf_exp.ops.logprobs import next_token_logprobs


def test_tiny_model_overfits_one_batch(tmp_path, tokenizer):
    cfg = resolved(tiny_config(tmp_path))
    torch.manual_seed(0)
    model = load_causal_lm(cfg.model, cfg.paths.cache_dir, tokenizer)
    examples = [SFTExample("SUBREDDIT: r/test\n\nTITLE: Hi\n\nPOST: My cat sat.\n\nTL;DR:", " cat sat"),
                SFTExample("SUBREDDIT: r/test\n\nTITLE: Yo\n\nPOST: It rained all day.\n\nTL;DR:", " rain all day")]
    batch = collate_sft([tokenize_sft(e, tokenizer, 64, 16) for e in examples], tokenizer.pad_token_id)
    mask = batch["response_mask"][:, 1:].float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        logps = next_token_logprobs(model, batch["input_ids"], batch["attention_mask"])
        loss = sft_loss(logps, mask, mask.sum())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[0] > 9.0  # ~log(49152) for a random model
    assert losses[-1] < 0.1 * losses[0], losses


def test_run_logs_params_metrics_artifacts_and_a_loadable_checkpoint(tmp_path):
    metrics = run(tiny_config(tmp_path, "stage.eval_every=2", "stage.lr=1e-3"))
    assert set(metrics) >= {"train/loss", "eval/loss", "eval/perplexity"}

    client, runs = mlflow_runs(tmp_path / "mlflow.db")
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED"
    params = r.data.params
    assert params["stage.lr"] == "0.001" and params["stage.max_steps"] == "3" and params["model.name"] == "tiny"
    assert params["seed"] == "42" and params["hardware.name"] == "cpu"
    for tag in ("stage", "model", "hardware", "data", "git_commit", "rlhf_exp_version", "checkpoint_dir"):
        assert r.data.tags.get(tag), tag
    assert r.data.tags["stage"] == "sft"

    train_loss = client.get_metric_history(r.info.run_id, "train/loss")
    assert [m.step for m in train_loss] == [1, 2, 3]
    eval_loss = client.get_metric_history(r.info.run_id, "eval/loss")
    assert [m.step for m in eval_loss] == [0, 2, 3]
    assert eval_loss[-1].value < eval_loss[0].value  # lr 1e-3 on a random model: the loss must fall
    for name in ("train/lr", "train/grad_norm", "train/tokens_per_s", "eval/perplexity"):
        assert client.get_metric_history(r.info.run_id, name), name

    artifacts = {a.path for a in client.list_artifacts(r.info.run_id, "config")}
    artifacts |= {a.path for a in client.list_artifacts(r.info.run_id, "plots")}
    artifacts |= {a.path for a in client.list_artifacts(r.info.run_id, "samples")}
    assert {"config/config.yaml", "plots/training_curves.png", "samples/step_000000.json",
            "samples/step_000003.json"} <= artifacts
    local = Path(client.download_artifacts(r.info.run_id, "samples/step_000003.json", str(tmp_path / "dl")))
    table = local.read_text()
    assert '"generation"' in table and '"reference"' in table

    checkpoint = Path(r.data.tags["checkpoint_dir"])
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert model.config.num_hidden_layers == 2


def test_a_refused_data_file_creates_no_run_and_the_next_run_in_the_process_starts(tmp_path):
    """Data and weights load before the tracker run opens: a file found but unreadable used to leave a FAILED
    MLflow run behind, although checks run before the run exists (a run failing in training: test_nonfinite)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": \n')
    with pytest.raises(Exception, match="invalid JSON"):
        run(tiny_config(tmp_path, "data=jsonl", f"data.path={bad}"))
    run(tiny_config(tmp_path, "stage.max_steps=1"))
    _, runs = mlflow_runs(tmp_path / "mlflow.db")
    assert [r.info.status for r in runs] == ["FINISHED"]


def test_a_full_disk_keeps_the_earlier_checkpoint_and_says_so_in_one_line(tmp_path, monkeypatch):
    from rlhf_exp.errors import DiskFullError, ReportedError
    from rlhf_exp.stages import base

    real_save, calls = torch.save, []

    def save_until_the_disk_fills(obj, file, *args, **kwargs):
        calls.append(file.name)  # checkpoints save through a file object (checkpoint.save_torch_file)
        if len(calls) > 1:  # step 2's checkpoint is written; the final one finds the disk full
            file.write(b"\0" * 1024)
            raise OSError(errno.ENOSPC, "No space left on device", file.name)
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(base.torch, "save", save_until_the_disk_fills)
    with pytest.raises(DiskFullError, match=r"no space left on the device while writing .*checkpoints.final ") as caught:
        run(tiny_config(tmp_path, "stage.max_steps=4", "stage.save_every=2", "stage.num_samples=0"))
    assert isinstance(caught.value, ReportedError)  # the entrypoint prints it as one line and exits 2
    checkpoints = Path(calls[0]).parent.parent
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000002"]  # no partial folder left behind
    assert torch.load(checkpoints / "step_000002" / "trainer_state.pt", weights_only=False)["step"] == 2
    _, runs = mlflow_runs(tmp_path / "mlflow.db")
    assert runs[-1].info.status == "FAILED"


def _train_losses(tmp_path, name, *overrides):
    run(tiny_config(tmp_path / name, "stage.lr=1e-3", "stage.max_steps=4", "stage.num_samples=0", *overrides))
    client, runs = mlflow_runs(tmp_path / name / "mlflow.db")
    history = client.get_metric_history(runs[-1].info.run_id, "train/loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)], runs[-1]


def test_same_seed_same_losses(tmp_path):
    """(Resumed runs: tests/test_resume.py, killed by a real SIGKILL.)"""
    full, _ = _train_losses(tmp_path, "full", "stage.save_every=2")
    again, _ = _train_losses(tmp_path, "again")
    assert full == again  # seed-deterministic, and writing checkpoints changes nothing


def test_masked_logprobs_equal_full_logprobs_and_right_padding_needs_no_mask(tmp_path, tokenizer):
    from rlhf_exp.ops.logprobs import masked_next_token_logprobs

    cfg = resolved(tiny_config(tmp_path))
    torch.manual_seed(0)
    model = load_causal_lm(cfg.model, cfg.paths.cache_dir, tokenizer).eval()
    items = [tokenize_sft(SFTExample("a b c d e f", " g h"), tokenizer, 64, 16),
             tokenize_sft(SFTExample("a", " b"), tokenizer, 64, 16)]
    batch = collate_sft(items, tokenizer.pad_token_id)
    mask = batch["response_mask"][:, 1:].float()
    with torch.no_grad():
        full = next_token_logprobs(model, batch["input_ids"], batch["attention_mask"]) * mask
        masked = masked_next_token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        unmasked = masked_next_token_logprobs(model, batch["input_ids"], None, batch["response_mask"])
    assert torch.allclose(full, masked, atol=1e-6)
    assert torch.allclose(full, unmasked, atol=1e-6)
    assert (masked != 0).sum() == mask.sum()


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_bitsandbytes_8bit_adamw_trains(tmp_path, optimizer):
    metrics = run(tiny_config(tmp_path, f"hardware.optimizer={optimizer}", "stage.lr=1e-3", "stage.max_steps=2",
                              "stage.num_samples=0"))
    client, runs = mlflow_runs(tmp_path / "mlflow.db")
    assert runs[0].info.status == "FINISHED" and runs[0].data.params["hardware.optimizer"] == optimizer
    losses = [m.value for m in client.get_metric_history(runs[0].info.run_id, "eval/loss")]
    assert losses[-1] < losses[0] and metrics["train/loss"] > 0


def test_adamw_is_fused_on_plain_tensors_and_steps_as_the_unfused_one():
    """The stage's AdamW takes torch's fused kernel where it can (a Python loop over tensors otherwise on
    CPU); catches the fused optimizer built with other groups, decay or betas than the loop it replaces."""
    from omegaconf import OmegaConf

    from rlhf_exp.optim import build_optimizer

    stage = OmegaConf.create({"lr": 1e-2, "weight_decay": 0.1, "adam_betas": [0.9, 0.95]})
    torch.manual_seed(0)
    fused_model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    loop_model = copy.deepcopy(fused_model)
    fused = build_optimizer(fused_model, stage)
    assert fused.defaults["fused"] is True
    loop = torch.optim.AdamW([{"params": [p for p in loop_model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
                              {"params": [p for p in loop_model.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.95), foreach=False)
    x = torch.randn(16, 8)
    for _ in range(3):
        for model, optimizer in ((fused_model, fused), (loop_model, loop)):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_liger_kernel_falls_back_to_the_chunked_head_on_a_cpu_and_is_refused_on_cuda_without_the_package(
        tmp_path, caplog):
    """Catches a CPU run that tried Liger's Triton kernel (an import or launch error), a fallback that computed
    a different loss, and a GPU run asking for Liger without it that silently ran without."""
    import importlib.util

    from omegaconf import OmegaConf

    from helpers import trainer_for
    from rlhf_exp.errors import ConfigError
    from rlhf_exp.ops.liger import liger_enabled
    from rlhf_exp.stages.sft import SFTTrainer

    caplog.set_level("INFO", logger="rlhf_exp.ops.liger")
    losses = []
    for flag in ("false", "true"):
        torch.manual_seed(0)
        trainer = trainer_for(SFTTrainer, tmp_path / flag, f"hardware.liger_kernel={flag}")
        losses.append(trainer.train_step()["train/loss"])
        assert trainer.liger is False
    assert losses[0] == losses[1]
    assert "on cpu the chunked LM head runs instead" in caplog.text

    on_cuda = OmegaConf.create({"liger_kernel": True, "device": "cuda"})
    if importlib.util.find_spec("liger_kernel") is None:
        with pytest.raises(ConfigError, match="hardware.liger_kernel.*pip install liger-kernel"):
            liger_enabled(on_cuda)
    else:
        assert liger_enabled(on_cuda)
