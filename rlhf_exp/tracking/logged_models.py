"""A finished stage's model as an MLflow 3 logged model, linked to its run (the run's Models column, the
experiment's Models tab), registrable (`tracking.register_as`) and loadable with `mlflow.pyfunc.load_model`.

A policy is logged with MLflow's transformers flavour (task text-generation: `mlflow.transformers.load_model`
gives a pipeline, pyfunc's `predict` takes prompts). A reward model is a pyfunc, `RewardScorer`: `predict` takes
a list of {prompt, response} dicts and returns the RM's normalized score of each, computed as stage=rm, GRPO
and PPO compute it (the response ended with the token the RM trained on; the normalization offset subtracted).
Both are built from the hub-ready folder `rlhf_exp.export` writes, so what is served is what is exported.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow.pyfunc

log = logging.getLogger(__name__)

UPLOAD_TAG = "rlhf_exp.upload"  # a logged model's tag: the outbox record it came from
REWARD_FOLDER = "reward_model"  # the pyfunc's artifact: the exported sequence-classifier folder
# what loading either model needs; written out so MLflow does not infer requirements (its inference imports
# packages such as torchvision that this project does not use)
REQUIREMENTS = ["torch", "transformers", "accelerate", "safetensors"]


class RewardScorer(mlflow.pyfunc.PythonModel):
    """The exported reward model as a scorer: rows of prompt and response in, normalized rewards out."""

    def load_context(self, context) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from rlhf_exp.models.reward import end_token_id

        folder = context.artifacts[REWARD_FOLDER]
        self.model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.end_id = end_token_id(self.model, self.tokenizer)
        self.reward_mean = float((context.model_config or {}).get("reward_mean") or 0.0)

    def predict(self, context, model_input: list[dict[str, str]], params: dict[str, Any] | None = None) -> list[float]:
        """`model_input`: [{"prompt": ..., "response": ...}, ...]."""
        import torch

        scores = []
        for row in model_input:  # one at a time: no padding to get wrong (these are evaluation calls)
            if "prompt" not in row or "response" not in row:  # MLflow makes a DataFrame rows of its first column
                raise ValueError("the reward model scores a list of {'prompt': ..., 'response': ...} dicts, not a "
                                 f"DataFrame (a row arrived as {sorted(row)})")
            ids = self.tokenizer(row["prompt"] + row["response"], add_special_tokens=True).input_ids + [self.end_id]
            with torch.no_grad():
                logit = self.model(input_ids=torch.tensor([ids])).logits[0, 0]
            scores.append(float(logit) - self.reward_mean)
        return scores


def save_policy(folder: Path, out: Path, name: str) -> None:
    """The exported policy at `folder` as an MLflow transformers model at `out`."""
    import mlflow.transformers
    from mlflow.models import infer_signature
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from huggingface_hub import ModelCard

    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    model.config._name_or_path = name  # MLflow records it as the source: a name, not this machine's path
    card = ModelCard.load(folder / "README.md")  # the export's card: its licence, instead of a hub lookup
    signature = infer_signature(["a prompt"], ["a response"], params={"max_new_tokens": 64, "do_sample": True,
                                                                      "temperature": 1.0})
    mlflow.transformers.save_model(transformers_model={"model": model, "tokenizer": tokenizer}, path=str(out),
                                   task="text-generation", signature=signature, pip_requirements=REQUIREMENTS,
                                   model_card=card)


def save_reward_model(folder: Path, out: Path, reward_mean: float) -> None:
    """The exported reward model at `folder` as a `RewardScorer` pyfunc at `out`."""
    example = [{"prompt": "Summarize: a post. TL;DR:", "response": " a summary"}]
    code = Path(__file__).with_name("reward_scorer_model.py")  # models from code: no pickle to trust on load
    mlflow.pyfunc.save_model(str(out), python_model=str(code), artifacts={REWARD_FOLDER: str(folder)},
                             model_config={"reward_mean": reward_mean}, input_example=example,
                             pip_requirements=[*REQUIREMENTS, "rlhf_exp"])


def model_name(run_name: str) -> str:
    """A logged model's name from its run's: MLflow refuses / : . % and quotes in one (a sweep job's "dpo
    beta=0.05" becomes "dpo beta=0_05")."""
    refused = {"/": "-", ":": "-", ".": "_", "%": "pct", '"': None, "'": None}
    return run_name.translate(str.maketrans(refused)) or "model"


def upload(client, run_id: str, record: dict[str, Any]) -> str:
    """An outbox record of kind "model" (an MLflow model folder) as a logged model of `run_id`, finalized READY,
    linked to the run as its output at `record["step"]`, and registered as `record["register_as"]` if set.
    Returns the model id."""
    from mlflow.entities import LoggedModelOutput

    experiment = client.get_run(run_id).info.experiment_id
    # a record sent again (the first try failed part-way) finishes the model that try made, not a second one
    earlier = client.search_logged_models([experiment], filter_string=f"tags.`{UPLOAD_TAG}` = '{record['key']}'")
    model = earlier[0] if earlier else client.create_logged_model(
        experiment, name=record["name"], source_run_id=run_id, model_type=record["model_type"],
        tags={UPLOAD_TAG: record["key"]})
    if str(model.status) != "READY":
        client.log_model_artifacts(model.model_id, record["path"])
        model = client.finalize_logged_model(model.model_id, "READY")
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, int(record.get("step") or 0))])
    if record.get("register_as") and not client.search_model_versions(f"name='{record['register_as']}' and "
                                                                       f"run_id='{run_id}'"):
        register(client, record["register_as"], model, run_id)
    return model.model_id


def register(client, name: str, model, run_id: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as error:  # it exists: a new version of it
        if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code):
            raise
    version = client.create_model_version(name, source=model.artifact_location, run_id=run_id,
                                          model_id=model.model_id)
    log.info("registered model %s version %s", name, version.version)


def model_type_of(folder: Path) -> str:
    architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    return "reward-model" if any(a.endswith("ForSequenceClassification") for a in architectures) else "policy"
