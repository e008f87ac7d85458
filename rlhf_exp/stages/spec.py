"""What a stage declares about itself, in its own file (`STAGE = StageSpec(...)` in stages/<name>.py).

Everything outside the stage that needs to know about it reads this: the config (the typed schema
of conf/stage/<name>.yaml), validation (cross-key checks), the entrypoint (the trainer, the parallel
modes it runs under), the memory planner (the models it holds and the activations it keeps) and
the hardware profiles (which micro-batch size it uses) and sweeps (the metric they optimize). A new stage is one Python file with a
`StageSpec` and one YAML file.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from rlhf_exp import vocabulary
from rlhf_exp.errors import ConfigError

log = logging.getLogger(__name__)

# the parallel= options (conf/parallel/): those that keep whole weights on every rank, and all of them
REPLICATED_WEIGHTS = ("ddp", "zero1")
EVERY_PARALLEL_MODE = ("ddp", "zero1", "zero2", "fsdp", "deepspeed_zero2", "deepspeed_zero3")


@dataclass(frozen=True)
class HeldModel:
    """A model the stage holds, for the memory planner."""

    role: str                      # policy, reference, reward model, critic, EMA ...
    shape: str = "policy"          # "policy": cfg.model's shape; "reward": the reward model's (reward.fn.path)
    trains: bool = False
    reward_head: bool = False      # a scalar head instead of the LM head
    quantized: bool | None = None  # None: 4-bit as hardware.load_in_4bit says
    weight_bytes: int | None = None  # bytes per weight as held; None: model.dtype's (what trains: see master_weights)
    rest_bytes: int | None = None  # bytes per weight of all but the decoder's linear layers (embeddings, norms,
    #                                the LM head), where they differ from weight_bytes (models.loading.frozen_copy)


@dataclass(frozen=True)
class Activations:
    """One micro batch's forward and backward through a held model."""

    role: str
    shape: str
    sequences: int
    tokens: int          # per sequence (the longest)
    scored_tokens: int   # positions projected onto the vocabulary (0: a scalar head)


@dataclass
class StageMemory:
    models: list[HeldModel]
    activations: list[Activations]
    kv_cache: tuple[int, int] | None = None  # (sequences, tokens) of a rollout's KV cache, on the policy
    notes: list[str] = field(default_factory=list)


class StageRunner(abc.ABC):
    """What the launcher runs for a stage (launch/run.py): built with (cfg, tracker, run_dir, memory_plan),
    `prepare` before the tracker run opens, `fit` inside it, `close` whatever happens. A `Trainer`
    (stages/base.py) is one; so is `stage=eval`'s evaluator, which trains nothing."""

    step: int = 0  # the step `fit` ended at: the sweep objective is logged there
    curve_metrics: tuple[str, ...] = ()  # what its training-curve figure draws over the steps (none: no steps)

    @abc.abstractmethod
    def prepare(self) -> None:
        """What can fail on the user's input (data, models, the resumed checkpoint), before the run opens."""

    @abc.abstractmethod
    def fit(self) -> dict[str, float]:
        """The stage's work; returns its final metrics."""

    @abc.abstractmethod
    def close(self) -> None:
        """Free the models so the next run in this process starts clean."""

    def longest_sequences(self) -> tuple[int, int | None] | None:
        """(the longest prompt, the longest response or None where responses are generated) in the data, in
        tokens, for the memory plan; None where there is no tokenized data to measure."""
        return None


def evaluation_line(metrics: dict[str, float], spec: StageSpec) -> str:
    """"loss 2.31 · perplexity 10.1": the stage's objective and report metrics, in that order."""
    keys = dict.fromkeys([spec.objective[0], *spec.report_metrics, "eval/accuracy", "eval/kl_k3"])
    shown = [k for k in keys if k in metrics] or sorted(metrics)[:4]
    return " · ".join(f"{k.split('/', 1)[-1]} {metrics[k]:.4g}" for k in shown)


def no_checks(cfg: DictConfig) -> None:
    """Cross-key checks a stage has none of."""


@dataclass(frozen=True)
class StageSpec:
    name: str
    config: type                   # the schema of conf/stage/<name>.yaml (a StageConfig subclass)
    trainer: type                  # the StageRunner that runs it (a Trainer subclass, for a stage that trains)
    micro_batch: str               # which hardware.micro_batch_size.<key> sizes its micro batches
    memory: Callable[[DictConfig], StageMemory]
    # its micro batch where the hardware profile names none for its key (a new key needs no profile edits)
    micro_batch_default: int = 4
    batch_key: str = "batch_size"  # the stage key micro batches split (and ranks divide)
    parallel: tuple[str, ...] = ()  # parallel= modes it runs under with several processes; () = one process
    parallel_note: str = ""        # why the others are refused
    disable_dropout: bool = True   # the default of model.disable_dropout
    checks: Callable[[DictConfig], None] = no_checks  # cross-key checks, before any work (ConfigError naming the key)
    # what the run reads that must be there before its tracker run exists (checkpoints, judges); not for plan=true
    input_checks: Callable[[DictConfig], None] = no_checks
    uses_reward: bool = False      # reads the `reward` group (GRPO, PPO): its missing values are refused up front
    init_from_reward_model: bool = False  # model.init_from may be a reward model (the RM stage goes on from one)
    # config groups (and `seed`) a resumed run must keep: they define what it trains on and how
    resume_fixed: tuple[str, ...] = ("stage", "model", "data", "seed")
    # what a sweep of this stage optimizes by default (sweep.objective / sweep.direction override it):
    # a held-out metric and whether larger is better ("max") or smaller ("min")
    objective: tuple[str, str] = ("eval/loss", "min")
    # what a sweep's report (rlhf_exp.report) plots against the swept value, and a trade-off to draw as
    # (x, y) with a point per job (reward against KL)
    report_metrics: tuple[str, ...] = ("eval/loss",)
    tradeoff: tuple[str, str] | None = None


# words of metric names where smaller is better, for an undeclared metric named without a direction
SMALLER_IS_BETTER = ("loss", "perplexity", "kl", "ece", "time", "length")


def metric_direction(spec: StageSpec, metric: str | None = None, direction: str | None = None) -> tuple[str, str]:
    """(metric, "max" | "min"): `metric` (None: the stage's objective; a name the vocabulary has renamed is
    taken as its current name) and `direction` (None: the objective's for that metric, else the vocabulary's
    `better`, else inferred from its name: a loss, perplexity, KL, ECE, time or length is minimized)."""
    default_metric, default_direction = spec.objective
    chosen = vocabulary.current_name(metric) if metric else default_metric
    if metric and chosen != metric:
        log.warning("metric %s is logged as %s now (rlhf_exp/vocabulary.py: RENAMED)", metric, chosen)
    if direction is None:
        declared = vocabulary.declared(chosen)
        if chosen == default_metric:
            direction = default_direction
        elif declared is not None and declared.better:
            direction = declared.better
        else:
            direction = "min" if any(word in chosen for word in SMALLER_IS_BETTER) else "max"
    return chosen, direction


def micro_batch(cfg: DictConfig, key: str) -> int:
    size = OmegaConf.select(cfg, f"hardware.micro_batch_size.{key}")
    if size is None:
        raise ConfigError(f"hardware.micro_batch_size.{key}", f"hardware={cfg.hardware.name} sets no micro batch "
                          f"size for {key!r}; add it to the profile or on the command line")
    return int(size)


def compute_bytes(cfg: DictConfig) -> int:
    """Bytes per weight of a frozen model held in the compute dtype (hardware.precision; auto counts as 16-bit)."""
    return 4 if cfg.hardware.precision == "fp32" else 2


def master_bytes(cfg: DictConfig) -> int:
    """Bytes per weight of what trains in full: fp32 masters (hardware.master_weights=fp32), else model.dtype's."""
    if cfg.hardware.get("master_weights", "fp32") == "fp32":
        return 4
    return 4 if cfg.model.dtype in ("float32", "fp32") else 2


def frozen_reference(cfg: DictConfig) -> HeldModel:
    """The reference a stage holds as a copy (models.loading.frozen_copy): linear layers in the compute dtype,
    the rest as the policy's master weights."""
    return HeldModel("reference", weight_bytes=compute_bytes(cfg), rest_bytes=master_bytes(cfg))


def sequence_tokens(cfg: DictConfig) -> tuple[int, int]:
    """(prompt tokens, response tokens + the EOS) at their configured caps."""
    return int(cfg.data.max_prompt_tokens), int(cfg.data.max_response_tokens) + 1
