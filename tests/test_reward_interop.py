"""Reward models this project did not train: any decoder AutoModelForSequenceClassification (a folder or a hub
id) scores GRPO's rollouts, read at the EOS as this project's own reward models are."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import GRPO, PAIRS, mlflow_runs, tiny_config

GRPO_RM = [arg for arg in GRPO if not arg.startswith("reward.")] + ["stage.minibatch_size=8", "reward=reward_model"]


def foreign_reward_model(folder: Path, tokenizer) -> Path:
    """A LlamaForSequenceClassification from a random config, as another library would save one (a pad token
    of its own)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_sequence_classifier_scores_at_the_eos_as_transformers_reads_it(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_exp.config import compose_config
    from rlhf_exp.models import load_tokenizer
    from rlhf_exp.rewards import RewardModelScorer

    cfg = compose_config(["model=tiny"])
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})  # pad != EOS: transformers then reads the EOS
    folder = foreign_reward_model(tmp_path / "rm", tokenizer)
    scorer = RewardModelScorer(str(folder))
    prompts, completions = ["Post: a cat.\nTL;DR:", "Post: a long move abroad.\nTL;DR:"], [" cat", " moving away"]
    ours = torch.tensor(scorer(prompts, completions))
    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = [p + c + hf_tokenizer.eos_token for p, c in zip(prompts, completions)]
    batch = hf_tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        theirs = AutoModelForSequenceClassification.from_pretrained(folder)(**batch).logits[:, 0]
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert (ours[0] - ours[1]).abs() > 1e-4


def test_grpo_trains_against_a_reward_model_this_project_did_not_train(tmp_path):
    from rlhf_exp.launch import run as app
    from rlhf_exp.config import compose_config
    from rlhf_exp.models import load_tokenizer

    cfg = compose_config(["model=tiny"])
    folder = foreign_reward_model(tmp_path / "rm", load_tokenizer(cfg.model, cfg.paths.cache_dir))
    app.run(tiny_config(tmp_path, *GRPO_RM, "stage.max_steps=2", f"reward.fn.path={folder}", "reward.missing_eos_score=null", "stage.num_samples=0"))
    run = mlflow_runs(tmp_path / "mlflow.db")[1][-1]
    assert run.info.status == "FINISHED"
    assert run.data.params["reward.fn.path"] == str(folder)
    assert "train/reward_std" in run.data.metrics and run.data.metrics["train/reward_std"] > 0


def test_a_folder_that_is_no_reward_model_is_refused_before_the_run(tmp_path):
    from rlhf_exp.config import check_inputs

    (tmp_path / "x").mkdir()
    with pytest.raises(Exception, match="reward.fn.path.*neither a reward model saved by stage=rm nor a "
                                        "ForSequenceClassification"):
        check_inputs(tiny_config(tmp_path, *GRPO_RM, f"reward.fn.path={tmp_path / 'x'}"))


@pytest.mark.parametrize("where", ["model.init_from", "model.path"])
def test_stage_rm_goes_on_from_a_sequence_classifier_with_its_head(tmp_path, where):
    """model.init_from=<a reward model another library saved> (or model.path with source=local, as a hub id
    is): training starts from its backbone and its score head, not from a fresh head, so step 0 scores as
    the classifier does."""
    from transformers import AutoModelForSequenceClassification

    from rlhf_exp.launch.run import resolved, run_dir_for
    from rlhf_exp.config import compose_config
    from rlhf_exp.data.collate import collate_pairs
    from rlhf_exp.models import load_tokenizer
    from rlhf_exp.stages.rm import RewardModelTrainer
    from rlhf_exp.tracking import Tracker

    cfg = compose_config(["model=tiny"])
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    folder = foreign_reward_model(tmp_path / "rm", tokenizer)
    model = ([f"model.init_from={folder}"] if where == "model.init_from" else
             ["model.source=local", f"model.path={folder}", "model.tokenizer=null"])
    cfg = resolved(tiny_config(tmp_path, "stage=rm", *PAIRS, "stage.norm_examples=4", *model))
    trainer = RewardModelTrainer(cfg, Tracker(), run_dir_for(cfg))
    trainer.setup()
    assert trainer.tokenizer.pad_token_id == tokenizer.pad_token_id  # the folder's own pad token, kept
    pairs = trainer.val_set[:3]
    batch = collate_pairs(pairs, trainer.tokenizer.pad_token_id)
    classifier = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        ours = trainer.model.eval()(batch["input_ids"], batch["lengths"])
        theirs = classifier(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert ours.std() > 1e-4


def test_a_policy_stage_refuses_a_reward_model_in_init_from(tmp_path):
    from rlhf_exp.config import compose_config, validate
    from rlhf_exp.errors import ConfigError
    from rlhf_exp.models import load_tokenizer

    cfg = compose_config(["model=tiny"])
    folder = foreign_reward_model(tmp_path / "rm", load_tokenizer(cfg.model, cfg.paths.cache_dir))
    with pytest.raises(ConfigError, match=r"model.init_from.*is a reward model, and stage=dpo trains a policy"):
        validate(tiny_config(tmp_path, "stage=dpo", *PAIRS, f"model.init_from={folder}"))


def test_the_scorer_batches_by_length_and_returns_scores_in_the_callers_order(tmp_path, tokenizer):
    """Catches scores put back in the sorted order instead of the caller's (rewards given to other samples)."""
    from rlhf_exp.rewards import RewardModelScorer

    scorer = RewardModelScorer(str(foreign_reward_model(tmp_path / "rm", tokenizer)), batch_size=2)
    prompts = ["Post: a long move abroad, and all that came with it.\nTL;DR:", "Post: a cat.\nTL;DR:",
               "Post: rent.\nTL;DR:", "Post: the job I left after nine years.\nTL;DR:", "Post: a dog.\nTL;DR:"]
    completions = [" moving away from everyone I know", " cat", " rent went up again this year", " quit", " dog"]
    together = scorer(prompts, completions)
    alone = [scorer([p], [c])[0] for p, c in zip(prompts, completions)]
    assert together == pytest.approx(alone, abs=1e-5)
    assert len({round(s, 4) for s in alone}) == len(alone)  # distinct scores: a swap would show


def test_the_scorer_ends_completions_with_the_token_the_rm_trained_on(tmp_path, tokenizer):
    """stage=rm trains on responses ending with the chat template's end of turn; the scorer appended the tokenizer's
    EOS. Where the two differ (Qwen2.5 base under ChatML: <|im_end|> against <|endoftext|>) every reward, the
    normalization and every judge figure was read at a token the RM never trained on, with no error."""
    from transformers import AutoConfig

    from rlhf_exp.data.tokens import encode_prompt
    from rlhf_exp.models.reward import END_TOKEN_KEY
    from rlhf_exp.rewards import RewardModelScorer

    folder = foreign_reward_model(tmp_path / "rm", tokenizer)
    trained_end = "<|endoftext|>"  # not this tokenizer's EOS (<|im_end|>): a template's end of turn stands in
    assert tokenizer.convert_tokens_to_ids(trained_end) != tokenizer.eos_token_id
    config = AutoConfig.from_pretrained(folder)
    setattr(config, END_TOKEN_KEY, trained_end)
    config.save_pretrained(folder)
    scorer = RewardModelScorer(str(folder))
    prompt, completion = "Post: a cat.\nTL;DR:", " a cat"
    ids = encode_prompt(prompt, tokenizer, 1024) + tokenizer(completion, add_special_tokens=False).input_ids
    with torch.no_grad():
        at_trained_end = scorer.model(torch.tensor([ids + [tokenizer.convert_tokens_to_ids(trained_end)]]),
                                      torch.tensor([len(ids) + 1])).item()
        at_eos = scorer.model(torch.tensor([ids + [tokenizer.eos_token_id]]), torch.tensor([len(ids) + 1])).item()
    assert at_trained_end != pytest.approx(at_eos, abs=1e-4)
    assert scorer([prompt], [completion])[0] == pytest.approx(at_trained_end, abs=1e-5)


def test_stage_rm_records_the_end_token_its_responses_ended_with(tmp_path):
    from transformers import AutoConfig

    from helpers import trainer_for
    from rlhf_exp.models.reward import END_TOKEN_KEY
    from rlhf_exp.stages.rm import RewardModelTrainer

    trainer = trainer_for(RewardModelTrainer, tmp_path, "stage=rm", *PAIRS, "stage.norm_examples=4")
    trainer.model.save_pretrained(tmp_path / "saved")
    recorded = getattr(AutoConfig.from_pretrained(tmp_path / "saved"), END_TOKEN_KEY)
    assert recorded == trainer.tokenizer.convert_ids_to_tokens(trainer.stop_token_ids[-1])
    trainer.close()
