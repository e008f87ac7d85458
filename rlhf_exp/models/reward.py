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
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward_model.json"


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

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

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
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float() - self.reward_mean

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
        return self.head(picked.to(self.head.weight.dtype)).squeeze(-1).float()

    def save_pretrained(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None, **kwargs) -> None:
        """Backbone as a Hugging Face folder, head + normalization beside it. `state_dict`: the whole
        model's state gathered from FSDP shards (keys "backbone.*", "head.*", "reward_mean")."""
        folder = Path(folder)
        state = state_dict if state_dict is not None else self.state_dict()
        backbone_state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        if state_dict is None:
            self.backbone.save_pretrained(folder, safe_serialization=True)
        else:
            from rlhf_exp.distributed import save_gathered

            save_gathered(self.backbone, folder, backbone_state)
        save_file({"weight": state["head.weight"].detach().float().contiguous().cpu(),
                   "reward_mean": state["reward_mean"].detach().reshape(1).cpu()}, str(folder / HEAD_FILE))
        (folder / META_FILE).write_text(json.dumps({
            "kind": "rlhf_exp.reward_model", "hidden_size": self.head.in_features,
            "reward_mean": float(state["reward_mean"]), "score_position": "last real token (EOS)"}, indent=2) + "\n")


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


def reward_model_from_causal_lm(causal_lm) -> RewardModel:
    """A fresh head on the causal LM's backbone (its pretrained weights; the LM head is dropped)."""
    backbone = causal_lm.base_model
    model = RewardModel(backbone, backbone.config.hidden_size)
    return model.to(next(backbone.parameters()).device)


def is_reward_model_folder(folder: str | Path) -> bool:
    return (Path(folder) / HEAD_FILE).is_file()


def is_sequence_classifier_folder(folder: str | Path) -> bool:
    """A transformers `<Arch>ForSequenceClassification` folder (TRL's, OpenRLHF's, or rlhf_exp.export's RM)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in json.loads(config.read_text()).get("architectures") or [])


class EncoderClassifier(Exception):
    """A sequence classifier without a decoder's last-token `score` head (BERT-like: it pools its own way)."""


def reward_model_from_sequence_classifier(path: str | Path, dtype: torch.dtype = torch.float32) -> RewardModel:
    """A decoder `AutoModelForSequenceClassification` with one label (a folder or a hub id) as a RewardModel:
    its base model and `score` head, read at the last real token from the lengths as every RM here is (the
    same position transformers finds when the pad token is not the EOS). The head's bias and an rlhf_exp
    export's `rlhf_exp_reward_mean` become the offset, so the scores are the exported RM's own."""
    from transformers import AutoModelForSequenceClassification

    from rlhf_exp.errors import ConfigError

    try:
        classifier = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError) as error:
        raise ConfigError("reward model path", f"{path} is neither a reward model folder of stage=rm nor a "
                          f"sequence-classification model transformers can load ({str(error)[:300]})") from None
    if classifier.config.num_labels != 1:
        raise ConfigError("reward model path", f"{path} has {classifier.config.num_labels} labels; a reward model "
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


def load_reward_model(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(RewardModel in eval mode, its tokenizer or None) from a folder saved by the RM stage (or a PPO
    checkpoint's critic/, which has no tokenizer of its own), or a decoder sequence-classification model
    (a folder or a hub id: TRL's and OpenRLHF's reward models, this project's export)."""
    from transformers import AutoModel, AutoTokenizer

    from rlhf_exp.errors import ConfigError

    from rlhf_exp.models.peft import weights_folder

    local = Path(folder).exists()
    folder = weights_folder(folder) if local else folder  # a LoRA checkpoint: its merged/ folder
    if local and not is_reward_model_folder(folder) and not is_sequence_classifier_folder(folder):
        raise ConfigError("reward model path", f"{folder} is not a reward model (no {HEAD_FILE} of stage=rm, and "
                          "not a ForSequenceClassification model)")
    if local and is_reward_model_folder(folder):
        backbone = AutoModel.from_pretrained(folder, dtype=dtype)
        model = RewardModel(backbone, backbone.config.hidden_size)
        load_head(model, folder)
    else:  # a sequence-classification folder, or a hub id
        model = reward_model_from_sequence_classifier(folder, dtype)
    tokenizer = None
    if not local or (Path(folder) / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer
