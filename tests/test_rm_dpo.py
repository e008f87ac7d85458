"""Reward-model and DPO stages on the tiny model: loading, learning signals, normalization, tracking."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from helpers import PAIRS, mlflow_runs, snapshot, tiny_config, trainer_for
from rlhf_exp.launch.run import resolved, run, run_dir_for
from rlhf_exp.data.collate import collate_sft
from rlhf_exp.models import load_causal_lm
from rlhf_exp.models.reward import load_reward_model, reward_model_from_causal_lm
from rlhf_exp.stages.dpo import DPOTrainer
from rlhf_exp.stages.rm import RewardModelTrainer
from rlhf_exp.tracking import Tracker

def rm_config(tmp_path, *overrides):
    return tiny_config(tmp_path, "stage=rm", *PAIRS, "stage.norm_examples=16", "hardware.micro_batch_size.rm=2",
                       *overrides)


def dpo_config(tmp_path, *overrides):
    return tiny_config(tmp_path, "stage=dpo", *PAIRS, "stage.eval_examples=16", "stage.num_samples=1",
                       "hardware.micro_batch_size.dpo=2", *overrides)


def build(trainer_cls, cfg, tmp_path):
    cfg = resolved(cfg)
    trainer = trainer_cls(cfg, Tracker(), run_dir_for(cfg))
    trainer.setup()
    return trainer


def assert_every_step_moves_the_weights(trainer, steps=3):
    for step in range(steps):
        before = snapshot(trainer.model)
        trainer.train_step()
        after = snapshot(trainer.model)
        moved = [k for k in before if not torch.equal(before[k], after[k])]
        assert len(moved) == len(before), f"step {step}: {len(before) - len(moved)} tensors did not move"


# ------------------------------------------------------------------ reward model


def test_rm_backbone_is_the_pretrained_causal_lm(tmp_path, tokenizer):
    """Its step-0 hidden states are the causal LM's: the weights are loaded, not re-initialized."""
    cfg = resolved(tiny_config(tmp_path))
    torch.manual_seed(3)
    causal = load_causal_lm(cfg.model, cfg.paths.cache_dir, tokenizer)
    causal.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    trainer = build(RewardModelTrainer, rm_config(tmp_path, f"model.init_from={tmp_path / 'lm'}"), tmp_path)
    ids = torch.tensor([tokenizer("Hello there, how are you?").input_ids])
    with torch.no_grad():
        expected = causal.base_model(input_ids=ids).last_hidden_state
        got = trainer.model.backbone(input_ids=ids).last_hidden_state
    assert torch.allclose(expected, got)
    head = trainer.model.head
    assert head.weight.shape == (1, 64) and head.bias is None
    assert abs(head.weight.std().item() - 1 / math.sqrt(65)) < 0.05


def test_rm_score_is_read_at_the_eos_not_before_it(tmp_path, tokenizer):
    cfg = resolved(tiny_config(tmp_path))
    model = reward_model_from_causal_lm(load_causal_lm(cfg.model, cfg.paths.cache_dir, tokenizer)).eval()
    from rlhf_exp.data.collate import TokenizedSFT

    eos = tokenizer.eos_token_id
    batch = collate_sft([TokenizedSFT([5, 6, 7], [8, eos]), TokenizedSFT([5], [8, eos])], tokenizer.pad_token_id)
    with torch.no_grad():
        scores = model(batch["input_ids"], batch["lengths"])
        alone = model(torch.tensor([[5, 8, eos]]), torch.tensor([3]))
        before_eos = model(torch.tensor([[5, 8]]), torch.tensor([2]))
    assert torch.allclose(scores[1], alone[0], atol=1e-6)  # padding (= EOS id) does not move the score
    assert not torch.allclose(alone, before_eos)


def test_num_layers_keeps_the_first_layers(tmp_path, tokenizer):
    cfg = resolved(tiny_config(tmp_path))
    torch.manual_seed(0)
    full = load_causal_lm(cfg.model, cfg.paths.cache_dir, tokenizer)
    full.save_pretrained(tmp_path / "lm")
    short_cfg = resolved(tiny_config(tmp_path, f"model.init_from={tmp_path / 'lm'}", "model.num_layers=1")).model
    short = load_causal_lm(short_cfg, cfg.paths.cache_dir, tokenizer)
    assert short.config.num_hidden_layers == 1 and len(short.model.layers) == 1
    assert torch.equal(short.model.layers[0].mlp.up_proj.weight, full.model.layers[0].mlp.up_proj.weight)
    from rlhf_exp.errors import ConfigError

    with pytest.raises(ConfigError, match="model.num_layers"):
        load_causal_lm(resolved(tiny_config(tmp_path, "model.num_layers=5")).model, cfg.paths.cache_dir, tokenizer)


def test_rm_every_gradient_step_changes_the_weights(tmp_path):
    """Every trainable tensor has a real gradient, so every Adam step moves it. A bias on the head did not:
    under Bradley-Terry its gradient cancels between chosen and rejected up to rounding, and Adam turned
    that rounding into full-size steps on some machines and thread schedules and not on others."""
    trainer = build(RewardModelTrainer, rm_config(tmp_path, "stage.lr=1e-3"), tmp_path)
    assert [name for name, _ in trainer.model.head.named_parameters()] == ["weight"]
    assert_every_step_moves_the_weights(trainer)


def test_rm_run_logs_step0_and_final_metrics_and_saves_a_normalized_model(tmp_path):
    run(rm_config(tmp_path, "stage.max_steps=4", "stage.lr=1e-3", "stage.eval_every=2"))
    client, runs = mlflow_runs(tmp_path / "mlflow.db")
    r = runs[0]
    assert r.info.status == "FINISHED"
    accuracy = client.get_metric_history(r.info.run_id, "eval/accuracy")
    assert [m.step for m in accuracy] == [0, 2, 4]
    for name in ("eval/loss", "eval/accuracy_ci_low", "eval/accuracy_ci_high", "eval/score_chosen",
                 "eval/score_rejected", "eval/margin", "eval/ece", "train/loss", "train/accuracy", "rm/norm_offset"):
        assert client.get_metric_history(r.info.run_id, name), name
    plots = {a.path for a in client.list_artifacts(r.info.run_id, "plots")}
    assert {"plots/reliability_step_000000.png", "plots/reliability_step_000004.png",
            "plots/training_curves.png"} <= plots

    # The saved RM, reloaded through the one loader later stages use, scores the SFT references at ~0.
    folder = Path(r.data.tags["checkpoint_dir"])
    model, tokenizer = load_reward_model(folder)
    assert float(model.reward_mean) != 0.0
    trainer = build(RewardModelTrainer, rm_config(tmp_path / "again"), tmp_path)  # same references
    batch = collate_sft(trainer.reference_set, tokenizer.pad_token_id)
    with torch.no_grad():
        scores = model(batch["input_ids"], batch["lengths"])
    assert abs(scores.mean().item()) < 1e-4


# ------------------------------------------------------------------ DPO


def test_dpo_loss_is_log2_at_step_0_and_every_step_moves_the_weights(tmp_path):
    trainer = build(DPOTrainer, dpo_config(tmp_path, "stage.lr=1e-3", "stage.num_samples=0"), tmp_path)
    metrics = trainer.evaluate()
    assert metrics["eval/loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert metrics["eval/margin"] == pytest.approx(0.0, abs=1e-4)
    assert_every_step_moves_the_weights(trainer)


def test_dpo_reference_on_the_fly_matches_the_precomputed_one(tmp_path):
    first = build(DPOTrainer, dpo_config(tmp_path / "a", "stage.lr=1e-3"), tmp_path).train_step()
    again = build(DPOTrainer, dpo_config(tmp_path / "b", "stage.lr=1e-3", "stage.precompute_ref_logps=false"),
                  tmp_path).train_step()
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert again["train/loss"] == pytest.approx(first["train/loss"], abs=1e-5)


def test_sweep_jobs_from_one_policy_score_the_reference_once(tmp_path, monkeypatch):
    """A beta sweep's jobs start from the same weights and visit the same pairs: the second job reads the
    first's reference log-probs from paths.cache_dir (the same numbers); other weights score afresh."""
    from rlhf_exp.data import disk_cache

    real_cache, real_score, scored = disk_cache.cached_rows, DPOTrainer._score, []
    monkeypatch.setattr(disk_cache, "cached_rows", lambda cache_dir, *rest: real_cache(
        cache_dir and tmp_path / "cache", *rest))  # this test's own cache, whatever earlier runs left
    monkeypatch.setattr(DPOTrainer, "_score", lambda self, model, pairs, desc: (
        scored.append(desc), real_score(self, model, pairs, desc))[1])

    first = build(DPOTrainer, dpo_config(tmp_path / "a", "stage.beta=0.1"), tmp_path)
    assert len(scored) == 2  # the pairs training visits, and the held-out ones
    second = build(DPOTrainer, dpo_config(tmp_path / "b", "stage.beta=0.5", "stage.lr=1e-3"), tmp_path)
    assert len(scored) == 2
    assert second.ref_train == first.ref_train and torch.equal(second.ref_val, first.ref_val)
    other = build(DPOTrainer, dpo_config(tmp_path / "c", "seed=7"), tmp_path)  # other initial weights and split
    assert len(scored) == 4 and not torch.equal(other.ref_val, first.ref_val)


def test_dpo_run_logs_its_metrics_from_log2(tmp_path):
    run(dpo_config(tmp_path, "stage.lr=1e-3", "stage.max_steps=6", "stage.batch_size=4", "stage.eval_every=3",
                   "stage.beta=0.5"))
    client, runs = mlflow_runs(tmp_path / "mlflow.db")
    r = runs[0]
    assert r.info.status == "FINISHED"
    for name in ("eval/loss", "eval/implicit_accuracy", "eval/implicit_accuracy_ci_low", "eval/margin",
                 "eval/rewards_chosen", "eval/rewards_rejected", "eval/logps_chosen", "eval/logps_rejected",
                 "eval/abs_logratio_per_token", "train/margin", "train/implicit_accuracy"):
        assert client.get_metric_history(r.info.run_id, name), name
    train_loss = [m.value for m in client.get_metric_history(r.info.run_id, "train/loss")]
    assert train_loss[0] == pytest.approx(math.log(2), abs=1e-3)
    # step 1 scores the policy against itself: every pair a tie, counted half (not a miss, which read as 0)
    accuracy = sorted(client.get_metric_history(r.info.run_id, "train/implicit_accuracy"), key=lambda m: m.step)
    assert accuracy[0].value == 0.5


def test_dpo_learns_the_pairs_it_trains_on(tmp_path):
    """Four pairs, seen every step: the loss on them falls well below log 2 (a chosen / rejected mix-up
    or a wrong sign would raise it)."""
    trainer = build(DPOTrainer, dpo_config(tmp_path, "data.max_train_examples=4", "stage.batch_size=4",
                                           "stage.lr=1e-3", "stage.beta=0.5", "stage.num_samples=0"), tmp_path)
    losses = [trainer.train_step()["train/loss"] for _ in range(6)]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert losses[-1] < math.log(2) - 0.1, losses


def test_dpo_resumed_with_more_steps_scores_the_added_pairs_under_the_starting_policy(tmp_path):
    """Before: `KeyError: 383` at the first step past the original stage.max_steps (the precomputed
    reference log-probs covered only the original steps)."""
    opts = ("stage.lr=1e-3", "stage.num_samples=0", "stage.batch_size=4", "stage.eval_every=null")
    whole = build(DPOTrainer, dpo_config(tmp_path / "whole", *opts, "stage.max_steps=4"), tmp_path)
    expected = dict(whole.ref_train)
    whole.close()
    run(dpo_config(tmp_path / "short", *opts, "stage.max_steps=2"))
    _, [short] = mlflow_runs(tmp_path / "short" / "mlflow.db")
    resumed = build(DPOTrainer, dpo_config(tmp_path / "more", *opts, "stage.max_steps=4",
                                           f"stage.resume_from={short.data.tags['checkpoint_dir']}"), tmp_path)
    assert resumed.step == 2 and sorted(resumed.ref_train) == sorted(expected)
    assert len(expected) > len(torch.load(Path(short.data.tags["checkpoint_dir"]) / "trainer_state.pt")["extra"]
                               ["ref_train"])  # some pairs are new to the resumed run
    for i, (chosen, rejected) in expected.items():  # the starting policy's, not the moved policy's
        assert resumed.ref_train[i] == pytest.approx((chosen, rejected), rel=1e-5, abs=1e-5)
    for _ in range(2):
        assert math.isfinite(resumed.train_step()["train/loss"])


@pytest.mark.parametrize("preset", ["simpo", "orpo"])
def test_a_reference_free_loss_trains_and_evaluates_without_a_reference(tmp_path, preset):
    """dpo_loss=simpo | orpo: no reference loaded or scored (the memory plan says so), a step moves the policy,
    the held-out figures come without the drift-from-reference one."""
    from rlhf_exp.planner import plan_run

    trainer = trainer_for(DPOTrainer, tmp_path, "stage=dpo", *PAIRS, f"+dpo_loss={preset}", "stage.lr=1e-3")
    assert trainer.reference is None and not trainer.ref_train and trainer.stage.loss_type == preset
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.train_step()
    assert math.isfinite(metrics["train/loss"]) and any(
        not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    held_out = trainer.evaluate()
    assert "eval/implicit_accuracy" in held_out and "eval/abs_logratio_per_token" not in held_out
    assert any(f"{preset} is reference-free" in note for note in plan_run(trainer.cfg).notes)
