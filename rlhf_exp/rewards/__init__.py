"""Reward functions for online RL (GRPO, PPO), named by `_target_` in the `reward` config group, and how a
rollout is scored with them (`Rewards`).

A reward function is called as TRL's GRPOTrainer calls one, so a TRL reward function runs unchanged: keyword
arguments `prompts`, `completions` (strings; for conversational data the prompt's messages and one-message
completions), `completion_ids` (the policy's token ids), `trainer_state` (`.global_step`, `.max_steps`), and
every other column of the prompt's data row by its name (`answer`, `solution`, ...); it returns one number per
completion, or None for one it does not score. The reward is the weighted sum over `reward.fn` and the
`reward.funcs` list (a None adds nothing). A completion without EOS gets `reward.missing_eos_score` instead of
that sum (it replaces, never adds: trl#2012). Built in: `length_reward`, `keyword_reward`, `RewardModelScorer`
(a trained RM), and `rewards.verifiable`'s `math_reward` and `format_reward`.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from rlhf_exp.errors import ConfigError
from rlhf_exp.rewards.verifiable import completion_text

log = logging.getLogger(__name__)


def length_reward(prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[Sequence[int]],
                  target_tokens: int = 20, **_) -> list[float]:
    """-|length - target| / target: 0 at exactly `target_tokens` tokens (the EOS counts), negative elsewhere."""
    return [-abs(len(ids) - target_tokens) / target_tokens for ids in completion_ids]


def keyword_reward(prompts: Sequence[str], completions: Sequence[str], keyword: str = "thanks",
                   case_sensitive: bool = False, **_) -> list[float]:
    """1 when the completion contains `keyword`, else 0."""
    texts = [completion_text(c) for c in completions]
    if case_sensitive:
        return [float(keyword in c) for c in texts]
    return [float(keyword.lower() in c.lower()) for c in texts]


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
    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_) -> list[float]:
        from rlhf_exp.data.batching import scores_in_length_order
        from rlhf_exp.data.collate import TokenizedSFT, collate_sft
        from rlhf_exp.data.tokens import encode_prompt

        end = self.end_id
        items = []
        for prompt, completion in zip(prompts, completions):
            if isinstance(prompt, list):  # conversational: the prompt through the RM's own chat template, as TRL does
                prompt = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            completion = completion_text(completion)
            response_ids = (self.tokenizer(completion, add_special_tokens=False).input_ids + [end])[: self.max_tokens]
            prompt_ids = encode_prompt(prompt, self.tokenizer, self.max_tokens - len(response_ids))
            items.append(TokenizedSFT(prompt_ids, response_ids))
        def score(chunk):
            batch = collate_sft(chunk, self.tokenizer.pad_token_id)
            return self.model(batch["input_ids"].to(self.device), batch["lengths"])

        # batches of similar lengths: the padding of a batch is to its longest sequence
        return scores_in_length_order(items, lambda x: len(x.prompt_ids) + len(x.response_ids), score,
                                      self.batch_size).tolist()


NAN_POLICIES = ("error", "ignore")


@dataclass
class RewardFunction:
    name: str          # in metrics: train/rewards/<name>/mean
    fn: Callable
    weight: float
    key: str           # the config key it came from (reward.fn, reward.funcs[1])


@dataclass
class Scores:
    """A rollout's scores: rewards [N] (the weighted sum, the no-EOS score substituted), raw [N] (the sum as
    the functions gave it), each function's own [N] (NaN where it returned None), whether each response stopped,
    and the texts."""
    rewards: torch.Tensor
    raw: torch.Tensor
    stopped: list[bool]
    texts: list[str]
    per_function: dict[str, torch.Tensor] = field(default_factory=dict)

    def subset(self, indices: list[int]) -> "Scores":
        at = torch.tensor(indices, dtype=torch.long)
        return Scores(self.rewards[at], self.raw[at], [self.stopped[i] for i in indices],
                      [self.texts[i] for i in indices], {k: v[at] for k, v in self.per_function.items()})

    @staticmethod
    def concat(parts: list["Scores"]) -> "Scores":
        return Scores(torch.cat([p.rewards for p in parts]), torch.cat([p.raw for p in parts]),
                      [s for p in parts for s in p.stopped], [t for p in parts for t in p.texts],
                      {k: torch.cat([p.per_function[k] for p in parts]) for k in parts[0].per_function})


def _is_number(value: Any) -> bool:
    if isinstance(value, numbers.Real):
        return True
    return isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex


class Rewards:
    """The run's reward functions (`reward.fn` and `reward.funcs`), called as TRL calls them, checked, summed.

    A function that raises, returns another number of values than completions, or a value that is neither a
    number nor None stops the run naming it (its config key) and the reason; a NaN does too unless
    `reward.on_nan=ignore` (then it counts as a None).

    A completion that every function returned None for gets a total of 0 (a warning counts them), and GRPO
    counts that 0 in its group's mean and std. TRL 1.16 differs here: it makes such a row NaN, leaves it out
    of the group's statistics and gives it advantage 0."""

    def __init__(self, functions: list[RewardFunction], on_nan: str = "error"):
        if on_nan not in NAN_POLICIES:
            raise ConfigError("reward.on_nan", f"must be one of {NAN_POLICIES}, got {on_nan!r}")
        self.functions, self.on_nan = functions, on_nan

    @property
    def reward_model(self):
        """The first trained reward model among the functions (its module), or None."""
        return next((f.fn.model for f in self.functions if isinstance(f.fn, RewardModelScorer)), None)

    def _checked(self, function: RewardFunction, values: Any, count: int, step: int) -> list[float]:
        where = f"at global_step {step}, reward function {function.name}"
        try:
            values = list(values)
        except TypeError:
            raise ConfigError(function.key, f"{where} returned {type(values).__name__}, not a list with one "
                              "number (or None) per completion") from None
        if len(values) != count:
            raise ConfigError(function.key, f"{where} returned {len(values)} values for {count} completions "
                              "(one number, or None, per completion)")
        out = []
        for index, value in enumerate(values):
            if value is None:
                out.append(math.nan)
                continue
            if not _is_number(value):
                raise ConfigError(function.key, f"{where} returned {type(value).__name__} {value!r:.40} for "
                                  f"completion {index}: a reward is a number or None")
            value = float(value)
            if math.isnan(value) and self.on_nan == "error":
                raise ConfigError("reward.on_nan", f"{where} ({function.key}) returned NaN for completion {index} "
                                  "(reward.on_nan=ignore counts a NaN as None: no score from that function)")
            out.append(value)
        return out

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]],
                 rows: Sequence[dict] | None = None, step: int = 0, max_steps: int = 0
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the weighted sum [N], {name: that function's values [N], NaN for None})."""
        count = len(completions)
        rows = list(rows) if rows is not None else [{}] * count
        columns = {key: [row.get(key) for row in rows] for key in (rows[0] if rows else {}) if key != "prompt"}
        if rows and isinstance(rows[0].get("prompt"), list):  # conversational, as TRL passes it
            prompts = [row["prompt"] for row in rows]
            completions = [[{"role": "assistant", "content": text}] for text in completions]
        arguments = dict(prompts=list(prompts), completions=list(completions),
                         completion_ids=[list(i) for i in completion_ids],
                         trainer_state=SimpleNamespace(global_step=step, max_steps=max_steps), **columns)
        per_function = {}
        for function in self.functions:
            try:
                values = function.fn(**arguments)
            except ConfigError:
                raise
            except Exception as exc:
                raise ConfigError(function.key, f"at global_step {step}, reward function {function.name} raised "
                                  f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc
            per_function[function.name] = torch.tensor(self._checked(function, values, count, step),
                                                       dtype=torch.float32)
        stacked = torch.stack(list(per_function.values()), dim=1)  # [N, functions]
        weights = torch.tensor([f.weight for f in self.functions], dtype=torch.float32)
        unscored = torch.isnan(stacked).all(dim=1)
        if bool(unscored.any()):
            log.warning("%d of %d completions were scored by no reward function (all returned None): their reward "
                        "is 0", int(unscored.sum()), count)
        return (stacked * weights).nansum(dim=1), per_function


def function_name(fn: Any) -> str:
    """A reward function's name in metrics: its own name, a partial's function's, a callable object's class."""
    target = getattr(fn, "func", fn)
    return getattr(target, "__name__", None) or type(target).__name__


def build_rewards(reward: DictConfig, allowed_targets: Sequence[str]) -> Rewards:
    """`reward.fn` (when set) and each `reward.funcs` entry, built; an entry's `weight` (default 1) and `name`
    (default the function's) are read off before it is built. A `_target_` naming a function is taken as it is
    (TRL's reward functions), not called to make one."""
    from hydra.utils import get_object

    from rlhf_exp.factory import build, check_targets

    entries = []
    if reward.get("fn") is not None:
        entries.append(("reward.fn", reward.fn))
    funcs = reward.get("funcs") or []
    if not OmegaConf.is_list(funcs) and not isinstance(funcs, list):
        raise ConfigError("reward.funcs", "must be a list of {_target_: ..., weight: ...} entries")
    entries += [(f"reward.funcs[{index}]", node) for index, node in enumerate(funcs)]
    if not entries:
        raise ConfigError("reward.funcs", "no reward function: set reward.fn or list reward.funcs (or pick a reward= "
                          "preset: length, keyword, reward_model, math)")
    functions, names = [], set()
    for key, node in entries:
        if not OmegaConf.is_dict(node) or "_target_" not in node:
            raise ConfigError(key, "needs a `_target_` naming a reward function or class")
        node = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
        weight = node.pop("weight", 1.0)
        name = node.pop("name", None)
        if not _is_number(weight) or not math.isfinite(float(weight)):
            raise ConfigError(f"{key}.weight", f"must be a finite number, got {weight!r}")
        check_targets(node, allowed_targets, key)  # before anything is imported
        try:
            target = get_object(str(node._target_))
        except Exception:
            target = None  # build reports it, naming the key
        if target is not None and not inspect.isclass(target) and "_partial_" not in node:
            node["_partial_"] = True
        fn = build(node, key, allowed_targets)
        name = str(name or function_name(fn))
        if name in names:
            name = f"{name}_{len(functions)}"
        names.add(name)
        functions.append(RewardFunction(name, fn, float(weight), key))
    return Rewards(functions, str(reward.get("on_nan") or "error"))


def score_responses(rewards: Rewards, tokenizer, prompts: Sequence[str], responses: Sequence[Sequence[int]],
                    stop_token_ids: Sequence[int], missing_eos_score: float | None, rows: Sequence[dict] | None = None,
                    step: int = 0, max_steps: int = 0) -> Scores:
    """The scores of sampled responses (ids); a response stopped if it ends with a stop token (EOS, or a chat
    turn's end)."""
    stopped = [bool(r) and r[-1] in stop_token_ids for r in responses]
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    raw, per_function = rewards(prompts, texts, responses, rows, step, max_steps)
    substituted = raw.clone()
    if missing_eos_score is not None:
        substituted[~torch.tensor(stopped, dtype=torch.bool)] = missing_eos_score
    return Scores(substituted, raw, stopped, texts, per_function)


def reward_function_totals(per_function: dict[str, torch.Tensor]) -> dict[str, float]:
    """Sums that add up over ranks: each function's count, sum, sum of squares and count of 0-or-1 values of the
    completions it scored (its None / NaN left out)."""
    out = {}
    for name, values in per_function.items():
        scored = values[~torch.isnan(values)].double()
        out.update({f"{name}:n": float(len(scored)), f"{name}:sum": float(scored.sum()),
                    f"{name}:sum_sq": float((scored ** 2).sum()),
                    f"{name}:binary": float(((scored == 0) | (scored == 1)).sum())})
    return out


def reward_function_metrics(totals: dict[str, float], prefix: str) -> dict[str, float]:
    """Each function's mean and (unbiased) std over the completions it scored, from `reward_function_totals`
    (`<prefix>/rewards/<name>/mean`, `/std`); where every value was 0 or 1 (a correctness check), the 95% Wilson
    interval of the mean too (`/ci_low`, `/ci_high`)."""
    from rlhf_exp.evaluation.statistics import std_from_sums, wilson_interval

    out = {}
    for name in dict.fromkeys(key.rsplit(":", 1)[0] for key in totals):
        n, total = totals[f"{name}:n"], totals[f"{name}:sum"]
        if not n:
            continue
        mean = total / n
        out[f"{prefix}/rewards/{name}/mean"] = mean
        out[f"{prefix}/rewards/{name}/std"] = std_from_sums(n, total, totals[f"{name}:sum_sq"])
        if totals[f"{name}:binary"] == n:
            low, high = wilson_interval(round(total), int(n))
            out[f"{prefix}/rewards/{name}/ci_low"], out[f"{prefix}/rewards/{name}/ci_high"] = low, high
    return out
