"""python -m rlhf_exp.export: a policy and a reward model as hub folders that plain transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from helpers import PAIRS, mlflow_runs, tiny_config

FAST = ["stage.max_steps=2", "stage.num_samples=0"]


def train(tmp_path: Path, *overrides: str) -> Path:
    from rlhf_exp.launch import run as app

    app.run(tiny_config(tmp_path, *FAST, *overrides))
    return Path(mlflow_runs(tmp_path / "mlflow.db")[1][-1].data.tags["run_dir"])


def test_a_policy_and_its_reward_model_export_to_folders_transformers_loads_alone(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from rlhf_exp.export import main
    from rlhf_exp.models.reward import load_reward_model

    sft = train(tmp_path, "stage=sft", "tracking.log_model=true")
    rm = train(tmp_path, "stage=rm", *PAIRS, "stage.norm_examples=8", f"model.init_from={sft}/checkpoints/final",
               "stage.lr=1e-2", "tracking.log_model=true", "tracking.register_as=tiny-rm")

    # the policy: the same weights, the run's sampling settings, a card with lineage and metrics
    assert main([str(sft), f"out={tmp_path / 'sft_export'}"]) == 0
    folder = tmp_path / "sft_export"
    exported = AutoModelForCausalLM.from_pretrained(folder)
    original = AutoModelForCausalLM.from_pretrained(sft / "checkpoints" / "final")
    ids = torch.tensor([[5, 17, 300, 42]])
    assert torch.equal(exported(ids).logits, original(ids).logits)
    generation = GenerationConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token_id in generation.eos_token_id and generation.max_new_tokens == 8  # TINY: stage.generation.max_new_tokens=8
    card = (folder / "README.md").read_text()
    assert "| sft |" in card and "eval/loss" in card and "training_curves.png" in card
    # huggingface_hub reads its metadata: the base weights' licence (model.license), no paths of this machine
    from huggingface_hub import ModelCard

    metadata = ModelCard.load(folder / "README.md").data
    assert metadata.license == "mit" and metadata.pipeline_tag == "text-generation" and "sft" in metadata.tags
    assert str(tmp_path) not in card and "/tmp/" not in card
    assert not (folder / "trainer_state.pt").exists() and (folder / "training_curves.png").is_file()

    # the reward model: its checkpoint and its export are sequence classifiers that score as the RM does
    assert main([str(rm), f"out={tmp_path / 'rm_export'}"]) == 0
    card = (tmp_path / "rm_export" / "README.md").read_text()
    lineage = card.split("## Lineage")[1].split("##")[0]
    assert lineage.index("| sft |") < lineage.index("| rm |")  # base -> sft -> rm, with run ids
    assert f"`{sft.name}/final`" in lineage and str(tmp_path) not in card
    base_tokenizer = AutoTokenizer.from_pretrained(sft / "checkpoints" / "final")
    assert base_tokenizer.pad_token_id == base_tokenizer.eos_token_id  # SmolLM2's: the case outside readers get wrong
    own_model, _ = load_reward_model(rm / "checkpoints" / "final")
    for folder in (rm / "checkpoints" / "final", tmp_path / "rm_export"):
        assert_outside_loaders_score_as_the_rm(folder, own_model)
    assert_logged_as_mlflow_models(tmp_path, own_model, base_tokenizer)


def assert_logged_as_mlflow_models(tmp_path: Path, own_model, tokenizer) -> None:
    """tracking.log_model: each run's final model is an MLflow logged model of that run (READY, its output), the
    policy generates through pyfunc, the reward model scores prompt + response through pyfunc as the project's RM
    does, the RM is registered (tracking.register_as), and each run lists its train and held-out data as inputs."""
    import mlflow

    from rlhf_exp.models.reward import end_token_id

    client, runs = mlflow_runs(tmp_path / "mlflow.db")
    sft_run, rm_run = runs
    found = client.search_logged_models([run.info.experiment_id for run in runs])
    models = {model.source_run_id: model for model in found}
    assert len(found) == 2 and str(models[sft_run.info.run_id].status) == "READY"
    assert models[sft_run.info.run_id].model_type == "policy" and models[rm_run.info.run_id].model_type == "reward-model"
    assert [output.model_id for output in rm_run.outputs.model_outputs] == [models[rm_run.info.run_id].model_id]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        policy = mlflow.pyfunc.load_model(f"models:/{models[sft_run.info.run_id].model_id}")
        [text] = policy.predict(["Summarize: the cat sat."], params={"max_new_tokens": 4, "do_sample": False})
        assert isinstance(text, str) and text.startswith("Summarize: the cat sat.")
        scorer = mlflow.pyfunc.load_model(f"models:/{models[rm_run.info.run_id].model_id}")
        rows = [{"prompt": "Summarize: the cat sat on the mat. TL;DR:", "response": " a cat sat"},
                {"prompt": "Summarize: moving. TL;DR:", "response": " moving to a new city for work"}]
        scores = torch.tensor(scorer.predict(rows))
    finally:
        mlflow.set_tracking_uri(previous)
    with torch.no_grad():
        own = torch.stack([own_model(torch.tensor([ids]), torch.tensor([len(ids)]))[0] for ids in (
            tokenizer(row["prompt"] + row["response"]).input_ids + [end_token_id(own_model.backbone, tokenizer)]
            for row in rows)])
    assert torch.allclose(scores, own, atol=1e-5) and (scores[0] - scores[1]).abs() > 1e-4
    [version] = client.search_model_versions("name='tiny-rm'")
    assert version.source == models[rm_run.info.run_id].artifact_location and version.run_id == rm_run.info.run_id

    inputs = {tag.value: dataset_input.dataset for dataset_input in rm_run.inputs.dataset_inputs
              for tag in dataset_input.tags if tag.key == "mlflow.data.context"}
    assert set(inputs) == {"train", "held-out"} and inputs["train"].name == "hh_rlhf"
    assert json.loads(inputs["train"].profile)["num_rows"] == int(rm_run.data.tags["data.num_train"])
    assert "**rm**" in rm_run.data.tags["mlflow.note.content"]


def assert_outside_loaders_score_as_the_rm(folder: Path, own_model) -> None:
    """transformers' AutoModelForSequenceClassification and text-classification pipeline, and TRL's
    get_reward, load `folder` and score right-padded texts ending in the EOS as this project's RM does."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
    from trl.experimental.utils import get_reward

    from rlhf_exp.models.reward import load_reward_model

    classifier = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # else the classifier reads the token before the EOS
    assert classifier.config.pad_token_id == tokenizer.pad_token_id
    texts = ["Summarize: the cat sat on the mat. TL;DR: a cat sat" + tokenizer.eos_token,
             "Summarize: a longer post about moving to a new city for work. TL;DR: moving" + tokenizer.eos_token,
             "short" + tokenizer.eos_token]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][:, -1].tolist().count(0) == 2  # padded: two rows shorter than the other
    with torch.no_grad():
        exported_scores = classifier(**batch).logits[:, 0]
        own = torch.stack([own_model(row[mask.bool()][None], torch.tensor([int(mask.sum())]))[0]
                           for row, mask in zip(batch["input_ids"], batch["attention_mask"])])
    offset = json.loads((folder / "config.json").read_text())["rlhf_exp_reward_mean"]
    assert offset != 0.0  # the RM was normalized on SFT references
    assert torch.allclose(exported_scores - offset, own, atol=1e-5)
    assert exported_scores.std() > 1e-3  # the rows score differently: the comparison means something
    # TRL's own reward code (what its PPO / online trainers score with) reads the same position
    with torch.no_grad():
        _, trl_scores, _ = get_reward(classifier, batch["input_ids"], tokenizer.pad_token_id, context_length=1)
    assert torch.allclose(trl_scores - offset, own, atol=1e-5)
    # pipeline("text-classification"), its raw score
    scored = pipeline("text-classification", model=str(folder), function_to_apply="none")(texts)
    assert torch.allclose(torch.tensor([s["score"] for s in scored]) - offset, own, atol=1e-5)
    print(f"{folder}: offset {offset:.6f}\n  ours (normalized)            {own.tolist()}\n"
          f"  AutoModelForSequenceClassification - offset {(exported_scores - offset).tolist()}\n"
          f"  TRL get_reward - offset              {(trl_scores - offset).tolist()}\n"
          f"  text-classification pipeline - offset {[s['score'] - offset for s in scored]}")
    # and the folder loads back here as a reward model (GRPO's reward.fn.path), offset included
    reloaded, reloaded_tokenizer = load_reward_model(folder)
    assert reloaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        again = torch.stack([reloaded(row[mask.bool()][None], torch.tensor([int(mask.sum())]))[0]
                             for row, mask in zip(batch["input_ids"], batch["attention_mask"])])
    assert torch.allclose(again, own, atol=1e-5)


def test_exporting_what_is_not_a_checkpoint_names_it(tmp_path, capsys):
    from rlhf_exp.export import main

    assert main([str(tmp_path)]) == 2
    assert f"{tmp_path} is not a checkpoint" in capsys.readouterr().err
