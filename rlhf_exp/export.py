"""A checkpoint as a hub-ready folder: `python -m rlhf_exp.export <run folder | checkpoint | MLflow run id>`.

    python -m rlhf_exp.export runs/pipelines/tldr/dpo-1a2b3c4d5e [which=best] [out=<folder>] [push_to_hub=me/x]

Writes `<run>/export/` (or `out`): safetensors weights, tokenizer, `generation_config.json` (the stage's
sampling settings, the stop tokens of its chat format) and a model card (README.md) with the training
config, the data, the lineage (which checkpoint each stage started from, with MLflow run ids), the run's
held-out metrics, and the pipeline's evaluation table and plots when the run is part of a pipeline.

A reward model (stage=rm) is a sequence-classification model, so `AutoModelForSequenceClassification`
loads it without this package: `<Arch>ForSequenceClassification` (num_labels 1), as stage=rm saves it
(`rlhf_exp.models.reward.save_sequence_classifier`). It reads the last token that is not the pad token, and
the RM was trained reading the EOS that ends each response, so the RM has a pad token of its own
(`give_own_pad_token`) and texts end with the EOS. The normalization offset (`reward_mean`) has no place in
the bias-free head: exported scores are the RM's plus that constant (in the card and in config.json).

`push_to_hub=<repo id>` uploads the folder with huggingface_hub (needs a network and a token).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from rlhf_exp.checkpoint import saved_config, written_into_place
from rlhf_exp.checkpoint_layout import WHICH, checkpoints_of
from rlhf_exp.errors import ConfigError
from rlhf_exp.tracking.records import RUN_RECORD, run_id_of

log = logging.getLogger(__name__)

# files of a checkpoint that belong in a hub folder (not trainer_state.pt, run_config.json, partitions)
HUB_FILES = re.compile(r"(.*\.safetensors|.*\.safetensors\.index\.json|config\.json|generation_config\.json|"
                       r"tokenizer.*|special_tokens_map\.json|vocab\.json|merges\.txt|added_tokens\.json|"
                       r"chat_template\.jinja)$")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def checkpoint_folder(target: str, which: str) -> Path:
    """The checkpoint `target` names: a checkpoint folder, a run folder (its checkpoints/final or /best),
    or an MLflow run id of this project (its run_dir tag, MLFLOW_TRACKING_URI's server or database)."""
    path = Path(target)
    if not path.exists() and _RUN_ID.match(target):
        from mlflow.tracking import MlflowClient

        run = MlflowClient().get_run(target)
        if "run_dir" not in run.data.tags:
            raise ConfigError("export", f"MLflow run {target} has no run_dir tag: not a run of this project")
        path = Path(run.data.tags["run_dir"])
    if checkpoints_of(path).is_dir():
        path = checkpoints_of(path) / WHICH[which]
    if not (path / "config.json").is_file() and not (path / "merged" / "config.json").is_file():
        raise ConfigError("export", f"{path} is not a checkpoint (no config.json): name a run folder, a "
                          f"checkpoint folder or an MLflow run id")
    return path


def export(checkpoint: Path, out: Path) -> Path:
    """Write the hub folder for `checkpoint` at `out` (replaced whole, written beside it first)."""
    from rlhf_exp.checkpoint_layout import weights_folder
    from rlhf_exp.models.reward import is_reward_model_folder

    config = saved_config(checkpoint)
    weights = weights_folder(checkpoint)
    if (weights / "adapter_config.json").is_file():
        raise ConfigError("hardware.lora.merge_on_save", f"{checkpoint} holds LoRA adapters without merged "
                          "weights: train with hardware.lora.merge_on_save=true to export it")
    reward_model = is_reward_model_folder(weights)
    with written_into_place(out) as staging:
        if reward_model:
            reward_mean = export_reward_model(weights, staging)
        else:
            reward_mean = None
            for file in weights.iterdir():
                if file.is_file() and HUB_FILES.match(file.name):
                    shutil.copy2(file, staging / file.name)
            write_generation_config(staging, config)
        figures = copy_figures(checkpoint, staging)
        (staging / "README.md").write_text(model_card(checkpoint, config, reward_mean, figures))
    log.info("exported %s -> %s", checkpoint, out)
    return out


def export_reward_model(weights: Path, staging: Path) -> float:
    """The RM as `<Arch>ForSequenceClassification` (num_labels 1) with a pad token that is not the EOS: what
    stage=rm saves already; an older checkpoint (the head in a file beside the backbone) is converted.
    Returns the normalization offset the head cannot hold."""
    from rlhf_exp.models.reward import give_own_pad_token, load_reward_model

    model, tokenizer = load_reward_model(weights)
    if tokenizer is None:
        raise ConfigError("export", f"{weights} has no tokenizer: export the RM run's checkpoint, not a critic")
    give_own_pad_token(model.backbone, tokenizer)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    return float(model.reward_mean)


def write_generation_config(staging: Path, config: dict) -> None:
    """The stage's sampling settings, stopping where its responses stopped (EOS and the chat end of turn)."""
    from transformers import AutoTokenizer, GenerationConfig

    from omegaconf import OmegaConf

    from rlhf_exp.data.formats.base import uses_chat_template
    from rlhf_exp.data.formats import FORMATS
    from rlhf_exp.data.tokens import stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(staging)
    data = config.get("data") or {}
    kind = FORMATS.get(data.get("format"))
    # data with turns through a template stops at its end of turn too (for a data=hub / data=file set that was
    # standard text this stop costs nothing)
    chat = bool(kind and kind.has_turns and uses_chat_template(OmegaConf.create(data), tokenizer))
    generation = (config.get("stage") or {}).get("generation") or {}
    GenerationConfig(do_sample=True, temperature=generation.get("temperature", 1.0),
                     top_k=generation.get("top_k") or 0, top_p=generation.get("top_p", 1.0),
                     max_new_tokens=generation.get("max_new_tokens") or data.get("max_response_tokens"),
                     eos_token_id=stop_token_ids(tokenizer, chat),
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(staging)


def lineage(checkpoint: Path) -> list[dict[str, Any]]:
    """[{stage, checkpoint, run, run_id}] from the base model to `checkpoint`, following model.init_from (`run`:
    the run folder's name and the checkpoint's, for a card that names no local path)."""
    chain, seen = [], set()
    current: Path | None = checkpoint
    while current is not None and current.resolve() not in seen:
        seen.add(current.resolve())
        try:
            config = saved_config(current)
        except (OSError, KeyError, ValueError):
            chain.append({"stage": "?", "checkpoint": str(current), "run": current.name, "run_id": None})
            break
        chain.append({"stage": (config.get("stage") or {}).get("name"), "checkpoint": str(current),
                      "run": f"{current.parent.parent.name}/{current.name}", "run_id": run_id_of(current.parent.parent)})
        parent = (config.get("model") or {}).get("init_from")
        current = Path(parent) if parent else None
    base = saved_config(checkpoint).get("model") or {}
    name = base.get("path") if base.get("source") == "hub" or base.get("source") == "gguf" else base.get("name")
    chain.append({"stage": "base", "checkpoint": name, "run": name, "run_id": None})
    return chain[::-1]


def held_out_metrics(checkpoint: Path) -> dict[str, float]:
    """The run's last eval/ metrics, from its MLflow run (empty when the tracker cannot be read)."""
    record = checkpoint.parent.parent / RUN_RECORD
    try:
        from mlflow.tracking import MlflowClient

        from rlhf_exp.redact import uri_with_password

        tracked = json.loads(record.read_text())
        metrics = MlflowClient(uri_with_password(tracked["tracking_uri"])).get_run(tracked["run_id"]).data.metrics
    except Exception as error:  # a card without numbers beats no export
        log.warning("no metrics for the model card (%s)", error)
        return {}
    return {k: v for k, v in sorted(metrics.items()) if k.startswith("eval/")}


def pipeline_evaluation(checkpoint: Path) -> Path | None:
    """The newest stage=eval folder of the pipeline this run belongs to (runs/pipelines/<name>/eval-*/eval)."""
    folders = sorted((checkpoint.parent.parent.parent).glob("eval-*/eval/summary.md"),
                     key=lambda p: p.stat().st_mtime)
    return folders[-1].parent if folders else None


def copy_figures(checkpoint: Path, staging: Path) -> list[str]:
    sources = [checkpoint.parent.parent / "training_curves.png"]
    evaluation = pipeline_evaluation(checkpoint)
    if evaluation is not None:
        sources.append(evaluation / "winrate_vs_kl.png")
    copied = []
    for source in sources:
        if source.is_file():
            shutil.copy2(source, staging / source.name)
            copied.append(source.name)
    return copied


def model_card(checkpoint: Path, config: dict, reward_mean: float | None, figures: list[str]) -> str:
    """README.md of the export: huggingface_hub's ModelCard with its metadata (licence, base model, data sets,
    pipeline tag) and a body that names runs by folder name and MLflow run id, never by this machine's paths."""
    from huggingface_hub import ModelCard, ModelCardData

    stage = (config.get("stage") or {}).get("name", "?")
    model, data = config.get("model") or {}, config.get("data") or {}
    hub_data = [v["path"] for v in (data.get("hub") or {}).values() if isinstance(v, dict) and v.get("path")]
    if data.get("source") == "hub" and data.get("path"):
        hub_data.append(data["path"])
    metadata = ModelCardData(
        license=model.get("license") or "other", library_name="transformers",
        pipeline_tag="text-classification" if reward_mean is not None else "text-generation",
        tags=["rlhf_exp", stage, "rlhf"], base_model=model.get("path") if model.get("source") != "local" else None,
        datasets=hub_data or None)
    what = ("a reward model (Bradley-Terry) as a sequence classifier" if reward_mean is not None
            else f"a policy after {stage}")
    lines = [f"# {model.get('name', 'model')}: {stage} on {data.get('name', '?')}", "",
             f"{what}, trained with rlhf_exp from run `{checkpoint.parent.parent.name}` ({checkpoint.name} "
             f"checkpoint). Licence: {model.get('license') or 'not recorded (model.license)'}, the base weights'.", ""]
    lines += [f"Weights: {model.get('dtype')} (model.dtype, what the run trained in; `torch_dtype=torch.bfloat16` "
              f"halves them on load where bf16 is enough).", ""]
    if model.get("source") == "gguf":  # base_model names the hub model; these weights are not its own
        lines += [f"The base weights are {model.get('path')} as the GGUF file `{model.get('gguf_file')}` ships them "
                  f"(quantized, dequantized to float before training), not the hub's own checkpoint: figures are "
                  f"close to, not comparable with, those published for it.", ""]
    lines += ["## Lineage", "", "| stage | run | MLflow run |", "|---|---|---|"]
    lines += [f"| {step['stage']} | `{step['run']}` | {step['run_id'] or ''} |" for step in lineage(checkpoint)]
    if (checkpoint.parent.parent.parent / "pipeline.json").is_file():
        lines += ["", f"Part of pipeline `{checkpoint.parent.parent.parent.name}`."]
    metrics = held_out_metrics(checkpoint)
    if metrics:
        lines += ["", "## Held-out metrics (the run's last evaluation)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in metrics.items() if not k.endswith(("_ci_low", "_ci_high"))]
    evaluation = pipeline_evaluation(checkpoint)
    if evaluation is not None:
        lines += ["", "## The pipeline's evaluation (stage=eval)", "", (evaluation / "summary.md").read_text()]
    lines += [f"\n![{name}]({name})" for name in figures]
    training = {k: v for k, v in (config.get("stage") or {}).items() if k not in ("resume_from",)}
    lines += ["", "## Training config", "", "```json",
              json.dumps({"stage": training, "data": {k: data.get(k) for k in ("name", "format", "phase",
                          "max_prompt_tokens", "max_response_tokens") if k in data},
                          "hardware": {k: (config.get("hardware") or {}).get(k) for k in ("name", "precision")},
                          "seed": config.get("seed")}, indent=1, default=str), "```", ""]
    if reward_mean is not None:
        lines += ["## Use", "", "```python",
                  "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
                  "model = AutoModelForSequenceClassification.from_pretrained(folder)",
                  "tokenizer = AutoTokenizer.from_pretrained(folder)",
                  "batch = tokenizer([prompt + response + tokenizer.eos_token], return_tensors='pt', padding=True)",
                  f"score = model(**batch).logits[:, 0] - {reward_mean:.6g}  # the RM's normalized score", "```", ""]
    else:
        lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(folder)  # generation_config.json: the run's sampling",
                  "```", ""]
    return str(ModelCard.from_template(metadata, template_str="---\n{{ card_data }}\n---\n\n{{ body }}\n",
                                       body="\n".join(lines)))


def push_to_hub(folder: Path, repo_id: str, private: bool) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    return str(api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="rlhf_exp export"))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # key=value as Hydra's command lines write them, or --key value
    argv = [f"--{a.split('=', 1)[0]}={a.split('=', 1)[1]}" if re.match(r"^\w+=", a) else a
            for a in (sys.argv[1:] if argv is None else argv)]
    parser = argparse.ArgumentParser(prog="python -m rlhf_exp.export", description=__doc__.split("\n")[0])
    parser.add_argument("source", help="a run folder, a checkpoint folder or an MLflow run id")
    parser.add_argument("--which", choices=["last", "best"], default="last", help="a run folder's final or best")
    parser.add_argument("--out", help="the folder to write (default: <run>/export)")
    parser.add_argument("--push_to_hub", help="a hub repo id to upload to")
    parser.add_argument("--private", default="false", choices=["true", "false"])
    args = parser.parse_args(argv)
    try:
        checkpoint = checkpoint_folder(args.source, args.which)
        out = Path(args.out) if args.out else checkpoint.parent.parent / "export"
        export(checkpoint, out)
        print(f"hub-ready folder: {out}")
        if args.push_to_hub:
            print(f"uploaded: {push_to_hub(out, args.push_to_hub, args.private == 'true')}")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
