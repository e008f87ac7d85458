"""Model loading: tiny random init, the embedded GGUF and its float cache, clear errors offline."""

from __future__ import annotations

import pytest
import torch

from rlhf_exp.launch.run import resolved
from rlhf_exp.config import compose_config
from rlhf_exp.errors import ConfigError
from rlhf_exp.models import load_causal_lm, load_tokenizer


def test_tiny_model_uses_the_smollm2_tokenizer_and_is_seeded(tokenizer):
    cfg = resolved(compose_config(["model=tiny"]))
    torch.manual_seed(1)
    a = load_causal_lm(cfg.model, cfg.paths.cache_dir, tokenizer)
    torch.manual_seed(1)
    b = load_causal_lm(cfg.model, cfg.paths.cache_dir, tokenizer)
    assert a.config.vocab_size == len(tokenizer) == 49152
    assert a.config.num_hidden_layers == 2
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == a.generation_config.eos_token_id


def test_hub_model_offline_fails_with_a_message_naming_the_key(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    cfg = resolved(compose_config(["model=qwen2_5_0_5b"]))
    with pytest.raises(ConfigError, match=r"`model.path`: could not load 'Qwen/Qwen2.5-0.5B'.*model.source=local"):
        load_tokenizer(cfg.model, cfg.paths.cache_dir)


def test_local_source_needs_an_existing_folder(tmp_path):
    cfg = resolved(compose_config(["model=tiny", "model.source=local", f"model.path={tmp_path}/nothing",
                                   "model.tokenizer=null"]))
    with pytest.raises(ConfigError, match="folder not found"):
        load_tokenizer(cfg.model, cfg.paths.cache_dir)


@pytest.mark.smoke
def test_embedded_smollm2_float_copy_matches_the_gguf(tmp_path):
    """The cached safetensors copy computes what the GGUF computes."""
    from transformers import AutoModelForCausalLM

    from rlhf_exp.models.embedded import float_checkpoint, gguf_location

    cfg = resolved(compose_config([]))
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    model = load_causal_lm(cfg.model, cfg.paths.cache_dir, tokenizer)
    folder = float_checkpoint(cfg.model, cfg.paths.cache_dir)
    assert (folder / "model.safetensors").is_file() and "quantization_config" not in (folder / "config.json").read_text()
    reference = AutoModelForCausalLM.from_pretrained(gguf_location(cfg.model, cfg.paths.cache_dir),
                                                     gguf_file=cfg.model.gguf_file, dtype=torch.float32)
    ids = tokenizer("SUBREDDIT: r/cats\n\nTITLE: My cat\n\nPOST: She sleeps all day.\n\nTL;DR:",
                    return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert model.config.num_hidden_layers == 30 and sum(p.numel() for p in model.parameters()) > 130e6


@pytest.mark.smoke
def test_smollm2_sft_steps_lower_the_training_loss(tmp_path):
    from helpers import mlflow_runs, tiny_config
    from rlhf_exp.launch.run import run

    cfg = tiny_config(tmp_path, "model=smollm2_135m", "hardware.precision=auto", "stage.max_steps=4",
                      "stage.lr=5e-5", "stage.warmup_steps=1", "stage.eval_examples=8", "stage.num_samples=1",
                      "data.max_prompt_tokens=128", "data.max_response_tokens=24", "stage.save_every=null")
    metrics = run(cfg)
    client, runs = mlflow_runs(tmp_path / "mlflow.db")
    evals = client.get_metric_history(runs[0].info.run_id, "eval/loss")
    assert runs[0].info.status == "FINISHED" and 0 < metrics["eval/loss"] < 10
    assert evals[-1].value < evals[0].value


@pytest.mark.smoke
def test_smollm2_qlora_dpo_runs_and_its_merged_folder_loads_and_generates(tmp_path):
    """Issue 5: QLoRA DPO on the embedded SmolLM2 on CPU; the merged folder is plain Hugging Face."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers import mlflow_runs, tiny_config
    from rlhf_exp.launch.run import run

    cfg = tiny_config(tmp_path, "model=smollm2_135m", "stage=dpo", "data=hh_rlhf", "data.val_size=8",
                      "data.max_train_examples=16", "data.max_prompt_tokens=64", "data.max_response_tokens=24",
                      "stage.max_steps=2", "stage.eval_examples=8", "stage.num_samples=0", "stage.lr=1e-4",
                      "hardware.precision=auto", "hardware.micro_batch_size.dpo=2",
                      "hardware.lora.enabled=true", "hardware.load_in_4bit=true")
    metrics = run(cfg)
    client, runs = mlflow_runs(tmp_path / "mlflow.db")
    assert runs[0].info.status == "FINISHED" and metrics["eval/loss"] > 0
    merged = Path(runs[0].data.tags["checkpoint_dir"]) / "merged"
    model = AutoModelForCausalLM.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert getattr(model.config, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) > 130e6  # full float weights, no adapters
    ids = tokenizer("\n\nHuman: What is a good name for a cat?\n\nAssistant:", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1] and tokenizer.decode(out[0, ids.shape[1]:]).strip()
