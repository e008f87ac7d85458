"""Scalar reward model: a causal-LM backbone and a `Linear(hidden, 1)` head read at the last
real token (the EOS). Used by the RM stage, and loaded by GRPO, PPO and evaluation through
`load_reward_model`.

Why not `AutoModelForSequenceClassification`: it finds the last token as the last one that
is not the pad token, and with SmolLM2 or Qwen (pad == EOS) that reads the score one token
before the EOS. Here the position comes from the sequence lengths.

Normalization (Stiennon et al. 2020; Huang et al. 2024): after training, the mean score of the
SFT reference responses is stored in `reward_mean` and subtracted in `forward`, so a saved
model scores references at ~0 wherever it is loaded.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from torch import nn

from rlhf_exp.checkpoint_layout import HEAD_FILE, weights_folder
from rlhf_exp.models.peft import add_adapters, is_4bit, load_adapter_weights

log = logging.getLogger(__name__)
PAD_TOKEN = "<|rlhf_exp_pad|>"  # a reward model's pad token when the tokenizer pads with its EOS
# config.json's record of the token every response the RM trained on ended with (a chat template's end of turn,
# else the EOS): scoring must end a completion with the same token (Qwen2.5 base: <|im_end|>, not its EOS)
END_TOKEN_KEY = "rlhf_exp_end_token"


def reward_mean_of(folder: str | Path) -> float:
    """The normalization offset an exported reward model's raw scores are above the RM's (its config.json)."""
    return float(json.loads((Path(folder) / "config.json").read_text()).get("rlhf_exp_reward_mean") or 0.0)


def record_end_token(model: nn.Module, token: str) -> None:
    """Keep in `model`'s config (saved with it) the token its training responses ended with."""
    setattr(model.config, END_TOKEN_KEY, token)


def end_token_id(model: nn.Module, tokenizer) -> int:
    """The id a completion scored by `model` must end with: the token it trained on where its config records one
    (this project's RMs), else the tokenizer's EOS (a reward model from elsewhere)."""
    token = getattr(model.config, END_TOKEN_KEY, None)
    if token is not None:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and tokenizer.convert_ids_to_tokens(token_id) == token:  # not the unknown token
            return int(token_id)
        log.warning("the reward model trained on responses ending with %r, which its tokenizer does not have: "
                     "scoring with the EOS", token)
    return tokenizer.eos_token_id


class RewardModel(nn.Module):
    """The head has no bias (as TRL's and OpenRLHF's): under the Bradley-Terry loss a bias cancels between
    chosen and rejected (its gradient is zero up to rounding), and `reward_mean` already sets the offset."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1, bias=False)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(hidden_size + 1))
        self.register_buffer("reward_mean", torch.zeros((), dtype=torch.float32))

    @property
    def config(self):
        return self.backbone.config

    def activation_checkpointing_enable(self) -> None:
        from rlhf_exp.models import enable_activation_checkpointing

        enable_activation_checkpointing(self.backbone)

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head on hidden states [..., H] -> [...] in fp32, outside autocast: under bf16 autocast the head's
        matmul would run in bf16, rounding a score of 5 to 1/32."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()

    def last_hidden(self, input_ids: torch.Tensor, lengths: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden state at each row's last real token: [B, T] ids, [B] lengths -> [B, H].

        Rows are right-padded, so with causal attention no real token sees a pad and
        `attention_mask` may be left out.
        """
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return hidden[rows, lengths.to(input_ids.device) - 1]

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalized scores [B] (fp32)."""
        hidden = self.last_hidden(input_ids, lengths, attention_mask)
        return self.score(hidden) - self.reward_mean

    def scores_at(self, positions: torch.Tensor, **inputs) -> torch.Tensor:
        """Normalized scores [N] (fp32) read at flat positions (row x T + column) of the [P, T] rows `inputs`
        give the backbone (several responses packed in a row: `ops.shared_prefix`)."""
        hidden = self.backbone(**inputs, use_cache=False).last_hidden_state.flatten(0, 1)[positions]
        return self.score(hidden) - self.reward_mean

    def response_values(self, input_ids: torch.Tensor, prompt_lengths: torch.Tensor,
                        response_lengths: torch.Tensor) -> torch.Tensor:
        """Critic values aligned with `ops.logprobs.response_logprobs`: [B, R].

        Value j is read at the position that predicts response token j (prompt_length - 1 + j),
        i.e. the state before the token is emitted. No normalization offset is applied.
        """
        hidden = self.backbone(input_ids=input_ids, use_cache=False).last_hidden_state  # right padded: no mask
        longest = int(response_lengths.max())
        positions = (prompt_lengths.to(input_ids.device)[:, None] - 1
                     + torch.arange(longest, device=input_ids.device)[None, :]).clamp(max=input_ids.shape[1] - 1)
        picked = torch.gather(hidden, 1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.score(picked)

    def save_pretrained(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None, **kwargs) -> None:
        """A standard `<Arch>ForSequenceClassification` folder (num_labels 1, the head as its `score`, the
        offset as `rlhf_exp_reward_mean` in config.json), which TRL, OpenRLHF and transformers' pipelines
        load. With LoRA adapters on the backbone: the adapters and the head (what a resumed run loads; the
        merged weights go to merged/ in the standard layout). `state_dict`: the whole model's state gathered
        from FSDP shards (keys "backbone.*", "head.*", "reward_mean")."""
        folder = Path(folder)
        state = state_dict if state_dict is not None else self.state_dict()
        if hasattr(self.backbone, "peft_config"):
            self.backbone.save_pretrained(folder, safe_serialization=True)
            save_file({"weight": state["head.weight"].detach().float().contiguous().cpu(),
                       "reward_mean": state["reward_mean"].detach().reshape(1).cpu()}, str(folder / HEAD_FILE))
            return
        save_sequence_classifier(self.backbone.config, state, folder)


def sequence_classifier_class(config):
    """transformers' `<Arch>ForSequenceClassification` for a backbone's config."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(config.model_type)
    if name is None or not hasattr(transformers, name):
        raise ValueError(f"transformers has no sequence-classification class for model_type={config.model_type}")
    return getattr(transformers, name)


def save_sequence_classifier(backbone_config, state: dict[str, torch.Tensor], folder: Path) -> None:
    """config.json + model.safetensors (sharded past 5 GB) as `AutoModelForSequenceClassification` reads
    them: the backbone's weights under the class's base-model prefix, the head as `score.weight`. The head
    has no bias, so the offset stays in the config: an outside loader's score is this model's plus
    `rlhf_exp_reward_mean`, read at the last token that is not the pad token (the EOS when pad != EOS)."""
    import copy

    from huggingface_hub import save_torch_state_dict

    classifier = sequence_classifier_class(backbone_config)
    config = copy.deepcopy(backbone_config)
    config.architectures = [classifier.__name__]
    config.num_labels = 1
    config.rlhf_exp_reward_mean = float(state["reward_mean"])
    config.rlhf_exp_score_position = "last real token (EOS); exported scores minus rlhf_exp_reward_mean are normalized"
    weights = {f"{classifier.base_model_prefix}.{name.removeprefix('backbone.')}": tensor.detach().contiguous()
               for name, tensor in state.items() if name.startswith("backbone.")}
    weights["score.weight"] = state["head.weight"].detach().contiguous()
    config.save_pretrained(folder)
    save_torch_state_dict(weights, folder)


def give_own_pad_token(backbone: nn.Module, tokenizer) -> None:
    """A pad token that is not the EOS, its row added to the embeddings if they have no spare one.

    Outside loaders (transformers' sequence classifiers, TRL's `get_reward`) find the score position as
    the last (or the first after the prompt) token that is not the pad token: with pad == EOS (SmolLM2,
    Qwen) they would read the token before the EOS this model was trained to score. Nothing reads the
    new row (pads follow the EOS, and attention is causal), so it is zeros, drawn from no RNG. The
    embedding's `padding_idx` (Llama's: the config's pad, no gradient) moves to it, so the EOS row trains
    and a reloaded model is built the same way."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        backbone.config.pad_token_id = tokenizer.pad_token_id
        return
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    grow_embeddings(backbone, len(tokenizer))
    backbone.config.pad_token_id = tokenizer.pad_token_id
    embeddings = backbone.get_input_embeddings()
    if getattr(embeddings, "padding_idx", None) is not None:  # the row kept out of the gradient, as a reload builds it
        embeddings.padding_idx = tokenizer.pad_token_id


def grow_embeddings(backbone: nn.Module, rows: int) -> None:
    """At least `rows` input embeddings (transformers' resize, which keeps a model's own embedding class,
    e.g. Gemma's scaled one); the new rows are zeros, and no RNG stream moves."""
    old = backbone.get_input_embeddings().weight
    if old.shape[0] >= rows:
        return
    devices = [old.device] if old.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        backbone.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        backbone.get_input_embeddings().weight[old.shape[0]:] = 0


def load_head(model: RewardModel, folder: str | Path) -> None:
    """The head and the normalization offset saved beside a backbone. A head saved with a bias (before the
    bias was dropped) folds it into the offset: w.h + b - mean = w.h - (mean - b)."""
    head = load_file(str(Path(folder) / HEAD_FILE))
    with torch.no_grad():
        model.head.weight.copy_(head["weight"])
        offset = head["reward_mean"].reshape(())
        if "bias" in head:
            offset = offset - head["bias"].reshape(())
        model.reward_mean.copy_(offset)


def load_score_head(model: RewardModel, folder: str | Path) -> None:
    """The `score` head and offset of a sequence-classifier folder onto `model` (whose backbone was loaded
    from the same folder, e.g. as a causal LM with its own dtype, 4-bit and attention settings). A
    `score.bias` in the file is left out, as transformers' decoder classifiers (bias-free) leave it."""
    from safetensors import safe_open

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            if "score.weight" in weights.keys():
                with torch.no_grad():
                    model.head.weight.copy_(weights.get_tensor("score.weight").reshape(model.head.weight.shape))
                    model.reward_mean.fill_(float(config.get("rlhf_exp_reward_mean") or 0.0))
                return
    from rlhf_exp.errors import ConfigError

    raise ConfigError("model.init_from", f"{folder} is a sequence classifier without a `score` head (score.weight)")


def sequence_classifier_to_start_from(model_cfg) -> Path | None:
    """The local folder of the sequence-classification model the RM stage starts from (`model.init_from`,
    or `model.path` with source=local | hub, a hub snapshot then), whose score head training goes on from;
    None when the model is a causal LM."""
    if model_cfg.get("init_from"):
        folder = weights_folder(model_cfg.init_from)
    elif model_cfg.get("source") == "local" and model_cfg.get("path"):
        folder = Path(model_cfg.path)
    elif model_cfg.get("source") == "hub" and model_cfg.get("path"):
        from huggingface_hub import snapshot_download
        from transformers import AutoConfig

        if not is_sequence_classifier(AutoConfig.from_pretrained(model_cfg.path).architectures):
            return None
        folder = Path(snapshot_download(model_cfg.path, allow_patterns=["config.json", "*.safetensors"]))
    else:
        return None
    if not is_sequence_classifier_folder(folder):
        return None
    log.info("%s is a sequence classifier: the reward model starts from its backbone and score head (its LOAD "
             "REPORT's unexpected score and missing lm_head are that)", folder)
    return folder


def reward_model_from_causal_lm(causal_lm) -> RewardModel:
    """A fresh head on the causal LM's backbone (its pretrained weights; the LM head is dropped)."""
    backbone = causal_lm.base_model
    model = RewardModel(backbone, backbone.config.hidden_size)
    return model.to(next(backbone.parameters()).device)


def is_reward_model_folder(folder: str | Path) -> bool:
    """A reward model `load_reward_model` reads: a sequence classifier (what stage=rm saves, or a TRL /
    OpenRLHF one), or a backbone with the head beside it (older checkpoints; LoRA adapters)."""
    return is_sequence_classifier_folder(folder) or (Path(folder) / HEAD_FILE).is_file()


def is_sequence_classifier_folder(folder: str | Path) -> bool:
    """A transformers `<Arch>ForSequenceClassification` folder (TRL's, OpenRLHF's, or rlhf_exp.export's RM)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    return is_sequence_classifier(json.loads(config.read_text()).get("architectures"))


def is_sequence_classifier(architectures) -> bool:
    """A config's `architectures` name a transformers `<Arch>ForSequenceClassification`."""
    return any(str(a).endswith("ForSequenceClassification") for a in architectures or [])


class EncoderClassifier(Exception):
    """A sequence classifier without a decoder's last-token `score` head (BERT-like: it pools its own way)."""


def reward_model_from_sequence_classifier(path: str | Path, dtype: torch.dtype = torch.float32,
                                         key: str = "reward.fn.path", quantization=None) -> RewardModel:
    """A decoder `AutoModelForSequenceClassification` with one label (a folder or a hub id) as a RewardModel:
    its base model and `score` head, read at the last real token from the lengths as every RM here is (the
    same position transformers finds when the pad token is not the EOS). The head's bias and an rlhf_exp
    export's `rlhf_exp_reward_mean` become the offset, so the scores are the exported RM's own. `quantization`:
    bitsandbytes' config for a 4-bit backbone (the `score` head is kept out of it and read in fp32)."""
    from transformers import AutoModelForSequenceClassification

    from rlhf_exp.errors import ConfigError

    try:
        classifier = AutoModelForSequenceClassification.from_pretrained(
            str(path), dtype=dtype, **quantized_loading(quantization, keep=("score",)))
    except (OSError, ValueError) as error:
        raise ConfigError(key, f"{path} is neither a reward model folder of stage=rm nor a "
                          f"sequence-classification model transformers can load ({str(error)[:300]})") from None
    if classifier.config.num_labels != 1:
        raise ConfigError(key, f"{path} has {classifier.config.num_labels} labels; a reward model "
                          "scores with one (num_labels=1)")
    score = getattr(classifier, "score", None)
    if not isinstance(score, nn.Linear):
        raise EncoderClassifier(f"{path}: {type(classifier).__name__} has no linear `score` head on a decoder "
                                "(an encoder classifier pools its own way; stage=eval judges with one as it is)")
    model = RewardModel(classifier.base_model, classifier.config.hidden_size)
    with torch.no_grad():
        model.head.weight.copy_(score.weight.float())
        offset = float(getattr(classifier.config, "rlhf_exp_reward_mean", 0.0) or 0.0)
        if score.bias is not None:
            offset -= float(score.bias)
        model.reward_mean.fill_(offset)
    return model


def quantized_loading(quantization, keep: tuple[str, ...] = ()) -> dict:
    """`from_pretrained` keywords for bitsandbytes' 4-bit loading (none without `quantization`), the modules
    named in `keep` left in float (a scalar head: 4-bit would round a score away)."""
    if quantization is None:
        return {}
    import copy

    quantization = copy.deepcopy(quantization)
    quantization.llm_int8_skip_modules = sorted(set(quantization.llm_int8_skip_modules or ()) | set(keep))
    return {"quantization_config": quantization}


def place_reward_model(model: RewardModel, device: str | torch.device) -> RewardModel:
    """The model on `device`; a 4-bit backbone stays where bitsandbytes put it (only the head and offset move)."""
    if is_4bit(model.backbone):
        model.head.to(device)
        model.reward_mean.data = model.reward_mean.data.to(device)
        return model
    return model.to(device)


def load_reward_model(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                      key: str = "reward.fn.path", quantization=None):
    """(RewardModel in eval mode, its tokenizer or None) from a decoder sequence-classification model (a
    folder or a hub id: what stage=rm saves, a PPO checkpoint's critic/ (no tokenizer of its own), TRL's and
    OpenRLHF's reward models), or an older checkpoint's backbone with its head beside it. `key`: the config
    key an error names. The backbone in `dtype` (a frozen scorer: the compute dtype), or its linear layers
    in 4-bit NF4 with `quantization` (bitsandbytes' config: `models.peft.quantization_config`); the head and
    the offset are fp32 either way."""
    from transformers import AutoModel, AutoTokenizer

    from rlhf_exp.errors import ConfigError

    local = Path(folder).exists()
    folder = weights_folder(folder) if local else folder  # a LoRA checkpoint: its merged/ folder
    if local and not is_reward_model_folder(folder):
        raise ConfigError(key, f"{folder} is not a reward model (not a ForSequenceClassification "
                          f"model, and no {HEAD_FILE})")
    if local and not is_sequence_classifier_folder(folder):  # the head beside a backbone (older checkpoints)
        backbone = AutoModel.from_pretrained(folder, dtype=dtype, **quantized_loading(quantization))
        model = RewardModel(backbone, backbone.config.hidden_size)
        load_head(model, folder)
    else:  # a sequence-classification folder, or a hub id
        model = reward_model_from_sequence_classifier(folder, dtype, key, quantization)
    tokenizer = None
    if not local or (Path(folder) / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return place_reward_model(model, device).eval(), tokenizer


def add_reward_adapters(model: nn.Module, hardware: DictConfig, saved: str | Path | None = None) -> nn.Module:
    """A reward model / critic for LoRA training: frozen, adapters on its backbone, the head trained
    in full; `saved` (a LoRA checkpoint folder of one) restores its adapters and head."""
    model.requires_grad_(False)
    model.backbone = add_adapters(model.backbone, hardware, "FEATURE_EXTRACTION")
    model.head.requires_grad_(True)
    if saved is not None:
        load_adapter_weights(model.backbone, saved)
        load_head(model, saved)
    return model
