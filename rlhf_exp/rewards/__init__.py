"""Reward sources for online RL (GRPO, PPO), named by `_target_` in the `reward` config group.

A reward function takes the prompts and completions (texts), plus `completion_ids` (the
policy's token ids), and returns one float per completion. Any user function with that
signature works: `reward.fn._target_=mypackage.mymodule.my_reward`.
A completion without EOS gets `reward.missing_eos_score` instead of its score (it replaces,
never adds: trl#2012).
"""

from __future__ import annotations

from typing import Sequence

import torch


def length_reward(prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[Sequence[int]],
                  target_tokens: int = 20, **_) -> list[float]:
    """-|length - target| / target: 0 at exactly `target_tokens` tokens (the EOS counts), negative elsewhere."""
    return [-abs(len(ids) - target_tokens) / target_tokens for ids in completion_ids]


def keyword_reward(prompts: Sequence[str], completions: Sequence[str], keyword: str = "thanks",
                   case_sensitive: bool = False, **_) -> list[float]:
    """1 when the completion contains `keyword`, else 0."""
    if case_sensitive:
        return [float(keyword in c) for c in completions]
    return [float(keyword.lower() in c.lower()) for c in completions]


class RewardModelScorer:
    """A trained reward model (stage=rm) as a reward function.

    Texts are re-encoded with the RM's own tokenizer, so an RM with a different tokenizer from
    the policy's works; each completion ends with the token the RM's responses ended with in training
    (recorded in its config by stage=rm; the EOS for an RM from elsewhere); its stored normalization
    (reward_mean) is applied by the model. It runs
    on the policy's device and precision (conf/reward/reward_model.yaml), frozen weights in the
    compute dtype, or its linear layers in 4-bit NF4 with `load_in_4bit` (hardware.load_in_4bit: a 7B
    RM beside a QLoRA policy on a 24 GB card); the head in fp32.
    """

    def __init__(self, path: str, batch_size: int = 8, max_tokens: int = 1024, device: str = "cpu",
                 precision: str = "fp32", key: str = "reward.fn.path", load_in_4bit: bool = False):
        from rlhf_exp.models.peft import nf4_config
        from rlhf_exp.models.reward import end_token_id, load_reward_model
        from rlhf_exp.runtime import DTYPES, choose_precision

        dtype = DTYPES[choose_precision(precision, str(device))[0]]
        self.model, self.tokenizer = load_reward_model(path, dtype=dtype, device=device, key=key,
                                                       quantization=nf4_config(dtype) if load_in_4bit else None)
        self.batch_size, self.max_tokens, self.device = batch_size, max_tokens, device
        self.end_id = end_token_id(self.model, self.tokenizer)  # what its training responses ended with

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **_) -> list[float]:
        from rlhf_exp.data.batching import scores_in_length_order
        from rlhf_exp.data.collate import TokenizedSFT, collate_sft
        from rlhf_exp.data.tokens import encode_prompt

        end = self.end_id
        items = []
        for prompt, completion in zip(prompts, completions):
            response_ids = (self.tokenizer(completion, add_special_tokens=False).input_ids + [end])[: self.max_tokens]
            prompt_ids = encode_prompt(prompt, self.tokenizer, self.max_tokens - len(response_ids))
            items.append(TokenizedSFT(prompt_ids, response_ids))
        def score(chunk):
            batch = collate_sft(chunk, self.tokenizer.pad_token_id)
            return self.model(batch["input_ids"].to(self.device), batch["lengths"])

        # batches of similar lengths: the padding of a batch is to its longest sequence
        return scores_in_length_order(items, lambda x: len(x.prompt_ids) + len(x.response_ids), score,
                                      self.batch_size).tolist()


def score_responses(reward_fn, tokenizer, prompts: Sequence[str], responses: Sequence[Sequence[int]],
                    stop_token_ids: Sequence[int], missing_eos_score: float | None):
    """(rewards with the no-EOS score substituted, raw scores, whether each response stopped, texts) of
    sampled responses (ids); a response stopped if it ends with a stop token (EOS, or a chat turn's end)."""
    stopped = [bool(r) and r[-1] in stop_token_ids for r in responses]
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    rewards, raw = score_completions(reward_fn, prompts, texts, responses, stopped, missing_eos_score)
    return rewards, raw, stopped, texts


def score_completions(reward_fn, prompts: Sequence[str], completions: Sequence[str],
                      completion_ids: Sequence[Sequence[int]], has_eos: Sequence[bool],
                      missing_eos_score: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards [N] with the no-EOS score substituted, raw scores [N])."""
    raw = torch.tensor(reward_fn(prompts=list(prompts), completions=list(completions),
                                 completion_ids=[list(i) for i in completion_ids]), dtype=torch.float32)
    if raw.shape != (len(completions),):
        raise ValueError(f"reward function returned {tuple(raw.shape)} scores for {len(completions)} completions")
    rewards = raw.clone()
    if missing_eos_score is not None:
        rewards[~torch.tensor(list(has_eos), dtype=torch.bool)] = missing_eos_score
    return rewards, raw
