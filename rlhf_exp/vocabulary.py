"""Every metric name the project logs, declared once: what it means, its unit, which way is better, and the
label a plot gives it. The report's axes, the pipeline's summary line and docs/layout.md's metric table read
it; the test suite refuses a logged name that is not here (tests/conftest.py), so a new stage's metrics
are declared before they reach a table or a console.

A name is `<scope>/<quantity>[_<which>][_<stat>]`: scope `train` (the step's batch), `eval` (the held-out
set), `time`, `memory`, `data`, `rm` (the reward model's normalization), `plan` (plan=true); `{x}` in a
pattern stands for one path segment (a policy, a reward function, a phase). One grammar throughout:
a pair's sides come after the quantity (`score_chosen`, `logps_rejected`), a KL names its estimator
(`kl_k3`, `kl_k1_seq`), and a 95% interval is `_ci_low` / `_ci_high` beside its figure. A name that
changed keeps working where people type one (`stage.best_metric`, `sweep.objective`, `report --metrics`):
`current_name` maps it, and RENAMED lists every such change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from rlhf_exp.evaluation.tables import markdown_table as table


@dataclass(frozen=True)
class Metric:
    pattern: str     # the name, `{x}` standing for one segment
    meaning: str
    unit: str = ""
    better: str = ""  # "max" | "min" | "" (neither: a diagnostic)
    label: str = ""   # an axis label, with its unit (plots fall back on the name)
    stages: str = ""  # which stages log it
    shown: frozenset[str] = frozenset()  # where a person sees it as it comes: "bar", "summary" (below)


# Where a metric is shown beyond MLflow and the report, by its declaration (a new stage's figures show
# where it declares them):
#   bar      the training progress bar's postfix, every step
#   summary  the pipeline's one line per finished stage
SHOWN_IN = ("bar", "summary")


def _m(pattern: str, meaning: str, unit: str = "", better: str = "", label: str = "", shown: str = "") -> Metric:
    return Metric(pattern, meaning, unit, better, label, shown=frozenset(shown.split()))


def _logged_by(stages: str, *metrics: Metric) -> tuple[Metric, ...]:
    return tuple(Metric(m.pattern, m.meaning, m.unit, m.better, m.label, stages, m.shown) for m in metrics)


METRICS: tuple[Metric, ...] = (
    *_logged_by('all',  # every trained stage
        _m("train/loss", "the step's training loss", "nats", "min", "training loss", shown="bar"),
        _m("train/lr", "learning rate at the step", "1"),
        _m("train/grad_norm", "gradient norm before clipping", "1"),
        _m("train/grad_scale", "fp16 loss scale (hardware.precision=fp16)", "1"),
        _m("train/skipped_steps", "steps skipped for a non-finite loss or gradient (stage.on_nonfinite)", "steps", "min"),
        _m("time/step_s", "wall time of the step", "s", "min", shown="bar"),
        _m("memory/peak_gib", "peak memory of the process (CPU: resident set; CUDA: allocated)", "GiB", "min"),
        _m("memory/baseline_gib", "memory in use once the data had loaded", "GiB"),
        _m("memory/peak_over_baseline_gib", "what the models and training added to the baseline", "GiB", "min"),
        _m("memory/planned_gib", "the memory plan's total", "GiB"),
        _m("memory/planned_tensors_gib", "the memory plan's tensors", "GiB"),
        _m("data/skipped_rows", "rows dropped under data.on_bad_row=skip", "rows", "min"),
    ),
    *_logged_by('sft, rm, dpo, kto',  # a loss on held-out data
        _m("eval/loss", "held-out loss", "nats", "min", "held-out loss", shown="summary"),
    ),
    *_logged_by('sft',  # SFT
        _m("train/tokens_per_s", "real tokens through forward and backward per second", "tokens/s", "max"),
        _m("eval/perplexity", "held-out perplexity", "1", "min", "held-out perplexity"),
    ),
    *_logged_by('rm, dpo, kto',  # the preference stages (KTO: desirable - undesirable)
        _m("train/margin", "mean (implicit) reward margin, chosen - rejected, over the batch", "reward", "max"),
        _m("eval/margin", "mean held-out (implicit) reward margin, chosen - rejected", "reward", "max",
           "held-out reward margin, chosen - rejected", shown="summary"),
    ),
    *_logged_by('rm',  # RM
        _m("train/accuracy", "share of the batch's pairs ranked right", "1", "max"),
        _m("eval/accuracy", "share of held-out pairs ranked right", "1", "max",
           "held-out accuracy (share of pairs ranked right)", shown="summary"),
        _m("eval/accuracy_ci_low", "eval/accuracy's 95% Wilson interval, lower end", "1"),
        _m("eval/accuracy_ci_high", "eval/accuracy's 95% Wilson interval, upper end", "1"),
        _m("eval/ece", "expected calibration error of P(chosen) = sigmoid(margin)", "1", "min",
           "expected calibration error"),
        _m("train/score_chosen", "mean reward of the chosen responses", "reward"),
        _m("train/score_rejected", "mean reward of the rejected responses", "reward"),
        _m("eval/score_chosen", "mean held-out reward of the chosen responses", "reward"),
        _m("eval/score_rejected", "mean held-out reward of the rejected responses", "reward"),
        _m("rm/norm_offset", "the normalization offset: the mean raw score subtracted from every reward", "reward"),
        _m("rm/reference_score_after_norm", "the normalization set's mean score after normalizing (about 0)", "reward"),
    ),
    *_logged_by('dpo',  # DPO
        _m("train/implicit_accuracy", "share of the batch's pairs whose implicit reward ranks chosen first", "1", "max"),
        _m("eval/implicit_accuracy", "share of held-out pairs whose implicit reward ranks chosen first", "1", "max",
           "held-out implicit accuracy (share of pairs)", shown="summary"),
        _m("eval/implicit_accuracy_ci_low", "eval/implicit_accuracy's 95% Wilson interval, lower end", "1"),
        _m("eval/implicit_accuracy_ci_high", "eval/implicit_accuracy's 95% Wilson interval, upper end", "1"),
        _m("train/logps_chosen", "log-probability of the chosen responses under the policy", "nats"),
        _m("train/logps_rejected", "log-probability of the rejected responses under the policy", "nats"),
        _m("eval/logps_chosen", "held-out log-probability of the chosen responses", "nats"),
        _m("eval/logps_rejected", "held-out log-probability of the rejected responses", "nats"),
        _m("eval/abs_logratio_per_token", "drift from the reference, mean |log pi/pi_ref| per token", "nats/token", "",
           "drift from the reference, |log pi/pi_ref| (nats / token)"),
    ),
    *_logged_by('dpo, kto',  # implicit rewards: DPO's pairs, KTO's desirable and undesirable examples
        _m("train/rewards_chosen", "implicit reward beta log(pi/pi_ref) of the chosen responses", "nats"),
        _m("train/rewards_rejected", "implicit reward beta log(pi/pi_ref) of the rejected responses", "nats"),
        _m("eval/rewards_chosen", "held-out implicit reward of the chosen responses", "nats"),
        _m("eval/rewards_rejected", "held-out implicit reward of the rejected responses", "nats"),
    ),
    *_logged_by('kto',  # KTO
        _m("train/reference_point", "KTO's reference point z0: the batch's KL estimate from mismatched pairs", "nats"),
        _m("eval/reference_point", "KTO's reference point z0 on the held-out examples", "nats"),
        _m("eval/label_accuracy", "share of held-out examples whose implicit reward is on their label's side of the "
           "reference point (ties half)", "1", "max", "held-out label accuracy", shown="summary"),
        _m("eval/label_accuracy_ci_low", "eval/label_accuracy's 95% Wilson interval, lower end", "1"),
        _m("eval/label_accuracy_ci_high", "eval/label_accuracy's 95% Wilson interval, upper end", "1"),
    ),
    *_logged_by('grpo, ppo',  # GRPO / PPO
        _m("train/optimizer_steps", "optimizer steps taken in the step (minibatches x updates per rollout)", "steps"),
        _m("time/{phase}_s", "wall time of one phase of the step (generation, scoring, reference, update, ...)", "s",
           "min"),
        _m("train/reward_mean", "mean reward of the step's samples", "reward", "max", "training reward (mean per sample)",
           shown="bar"),
        _m("train/reward_std", "standard deviation of the step's rewards", "reward"),
        _m("train/score_mean", "mean score before the KL penalty and the missing-EOS score", "reward", "max"),
        _m("train/rewards/{function}/mean", "one reward function's mean over the step's samples", "reward", "max"),
        _m("train/rewards/{function}/std", "one reward function's standard deviation over the step's samples", "reward"),
        _m("train/rewards/{function}/ci_low", "a 0/1 reward function's mean: 95% Wilson interval, lower end", "1"),
        _m("train/rewards/{function}/ci_high", "a 0/1 reward function's mean: 95% Wilson interval, upper end", "1"),
        _m("train/kl_k3", "k3 estimate of KL(policy || reference) per token on the step's samples", "nats/token", "min"),
        _m("train/entropy", "mean per-token entropy of the policy on its samples", "nats/token"),
        _m("train/clip_fraction", "share of tokens whose ratio was clipped", "1"),
        _m("train/approx_kl", "k3 estimate of KL(old policy || policy) per token over the update", "nats/token"),
        _m("train/first_minibatch_approx_kl", "approx_kl of the first minibatch (0 when on-policy)", "nats/token"),
        _m("train/first_minibatch_ratio", "mean ratio pi/pi_old of the first minibatch (1 when on-policy)", "1"),
        _m("train/ratio_mean", "mean ratio pi/pi_old over the update", "1"),
        _m("train/flat_group_fraction", "share of GRPO groups whose rewards were all equal (no advantage)", "1", "min"),
        _m("train/response_length", "mean response length of the step's samples", "tokens"),
        _m("train/eos_rate", "share of the step's samples that ended with a stop token", "1", "max"),
        _m("train/rollout_sequences", "sequences sampled in the step", "sequences"),
        _m("train/policy_loss", "PPO's clipped surrogate loss, per token", "1"),
        _m("train/value_loss", "PPO's value loss", "1", "min"),
        _m("train/value_clip_fraction", "share of tokens whose value prediction was clipped", "1"),
        _m("train/ptx_loss", "PPO-ptx: the SFT loss on the pretraining / reference data (stage.ptx_coef)", "nats", "min"),
        _m("train/non_score_reward", "the KL penalty in the reward (PPO, RLOO, REINFORCE++), summed per sequence",
           "reward"),
        _m("train/sampling_rounds", "dynamic sampling (DAPO): rollouts drawn to fill the step's batch", "rollouts", "min"),
        _m("train/dropped_groups", "dynamic sampling (DAPO): groups dropped for equal rewards in the step", "groups"),
        _m("train/generated_tokens", "GRPO: tokens generated by training rollouts so far (stage.max_generated_tokens "
           "caps them)", "tokens", "min"),
        _m("train/overlong_penalty_mean", "DAPO's soft overlong penalty, mean over the step's samples", "reward"),
        _m("eval/reward_mean", "mean held-out reward per sample", "reward", "max", "held-out reward (mean per sample)",
           shown="summary"),
        _m("eval/score_mean", "mean held-out score before the missing-EOS score", "reward", "max"),
        _m("eval/rewards/{function}/mean", "one reward function's held-out mean", "reward", "max"),
        _m("eval/rewards/{function}/std", "one reward function's held-out standard deviation", "reward"),
        _m("eval/rewards/{function}/ci_low", "a 0/1 reward function's held-out mean: 95% Wilson interval, lower end",
           "1"),
        _m("eval/rewards/{function}/ci_high", "a 0/1 reward function's held-out mean: 95% Wilson interval, upper end",
           "1"),
        _m("eval/kl_k3", "k3 estimate of KL(policy || reference) per token on held-out prompts", "nats/token", "min",
           "KL(policy || reference) (nats / token)", shown="summary"),
        _m("eval/response_length", "mean held-out response length", "tokens", "", "response length (tokens)"),
        _m("eval/eos_rate", "share of held-out samples that ended with a stop token", "1", "max"),
    ),
    *_logged_by('eval',  # stage=eval
        _m("eval/judge_score", "mean judge score of the last policy listed", "reward", "max"),
        _m("eval/{policy}/{judge}_score", "a policy's mean score from one judge (the judge RM, the training RM)",
           "reward", "max"),
        _m("eval/{policy}/{judge}_win_vs_{other}", "share of prompts where the judge scores the policy's answer above "
           "the other's (the reference answer, or stage.baseline's)", "1", "max"),
        _m("eval/{policy}/{judge}_win_vs_{other}_ci_low", "the win rate's 95% Wilson interval, lower end", "1"),
        _m("eval/{policy}/{judge}_win_vs_{other}_ci_high", "the win rate's 95% Wilson interval, upper end", "1"),
        _m("eval/{policy}/{judge}_lc_win_vs_{other}", "length-controlled win rate (AlpacaEval 2's regression)", "1",
           "max"),
        _m("eval/{policy}/{judge}_lc_win_vs_{other}_ci_low", "the LC win rate's 95% bootstrap interval, lower end", "1"),
        _m("eval/{policy}/{judge}_lc_win_vs_{other}_ci_high", "the LC win rate's 95% bootstrap interval, upper end", "1"),
        _m("eval/{policy}/kl_k1_seq", "k1 (sampled) estimate of KL(policy || reference) per answer", "nats", "min"),
        _m("eval/{policy}/kl_k1_seq_ci_low", "the sampled KL's 95% normal interval, lower end", "nats"),
        _m("eval/{policy}/kl_k1_seq_ci_high", "the sampled KL's 95% normal interval, upper end", "nats"),
        _m("eval/{policy}/kl_k1_token", "k1 (sampled) estimate of KL(policy || reference) per token", "nats/token", "min"),
        _m("eval/{policy}/length", "mean answer length", "tokens"),
        _m("eval/{policy}/eos_rate", "share of answers that ended with a stop token", "1", "max"),
        _m("eval/{policy}/rouge_l", "ROUGE-L F1 against the reference answers", "1", "max"),
        _m("eval/{policy}/distinct_1", "distinct unigrams over all answers", "1", "max"),
        _m("eval/{policy}/distinct_2", "distinct bigrams over all answers", "1", "max"),
        _m("eval/{judge}/pair_accuracy", "share of held-out preference pairs a judge ranks right", "1", "max"),
        _m("eval/{policy}/dpo_implicit_accuracy", "share of held-out pairs a DPO policy's implicit reward ranks right",
           "1", "max"),
        _m("eval/{judge}/pair_accuracy_ci_low", "pair_accuracy's 95% Wilson interval, lower end", "1"),
        _m("eval/{judge}/pair_accuracy_ci_high", "pair_accuracy's 95% Wilson interval, upper end", "1"),
        _m("eval/{policy}/dpo_implicit_accuracy_ci_low", "dpo_implicit_accuracy's 95% Wilson interval, lower end", "1"),
        _m("eval/{policy}/dpo_implicit_accuracy_ci_high", "dpo_implicit_accuracy's 95% Wilson interval, upper end", "1"),
    ),
    *_logged_by('sweeps, plan=true',  # sweeps and plan=true
        _m("objective", "a sweep job's objective (sweep.objective), one column for every sweep", ""),
        _m("best/{objective}", "a sweep's best objective", ""),
        _m("jobs_finished", "a sweep's jobs that finished", "jobs"),
        _m("jobs_failed", "a sweep's jobs that failed", "jobs", "min"),
        _m("plan/total_gib", "plan=true: the memory plan's total", "GiB"),
        _m("plan/tensors_gib", "plan=true: the memory plan's tensors", "GiB"),
        _m("plan/fits", "plan=true: 1 if the plan fits the hardware's memory", "1"),
    ),
)


# the names a metric had before the grammar above: old pattern -> new pattern
RENAMED: dict[str, str] = {
    "train/chosen_score": "train/score_chosen", "train/rejected_score": "train/score_rejected",
    "eval/chosen_score": "eval/score_chosen", "eval/rejected_score": "eval/score_rejected",
    "rm/reward_mean": "rm/norm_offset",
    "train/kl": "train/kl_k3", "eval/kl": "eval/kl_k3",
    "eval/{policy}/kl_seq": "eval/{policy}/kl_k1_seq", "eval/{policy}/kl_token": "eval/{policy}/kl_k1_token",
    **{f"eval/{{policy}}/{{judge}}_{win}_vs_{{other}}_{end}": f"eval/{{policy}}/{{judge}}_{win}_vs_{{other}}_ci_{end}"
       for win in ("win", "lc_win") for end in ("low", "high")},
    **{f"eval/{{{who}}}/{figure}_{end}": f"eval/{{{who}}}/{figure}_ci_{end}"
       for who, figure in (("judge", "pair_accuracy"), ("policy", "dpo_implicit_accuracy")) for end in ("low", "high")},
}


def current_name(name: str) -> str:
    """The name metric `name` is logged under now: itself, or what RENAMED made of it (the segments that
    `{x}` stood for carried over)."""
    for old, new in RENAMED.items():
        match = re.fullmatch(re.sub(r"\\\{([a-z_]+)\\\}", r"(?P<\1>[^/]+)", re.escape(old)), name)
        if match:
            return new.format(**match.groupdict())
    return name


@lru_cache(maxsize=None)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile("^" + re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(pattern)) + "$")


@lru_cache(maxsize=4096)
def declared(name: str) -> Metric | None:
    """The declaration `name` falls under: an exact name before a pattern."""
    exact = next((metric for metric in METRICS if metric.pattern == name), None)
    return exact or next((metric for metric in METRICS if _compiled(metric.pattern).match(name)), None)


def label(name: str) -> str:
    """An axis label for metric `name`: its declared label, else the name itself."""
    metric = declared(name)
    return metric.label if metric is not None and metric.label else name


def shown(where: str, metrics: dict[str, float]) -> dict[str, float]:
    """Those of `metrics` declared to be shown `where` (one of SHOWN_IN), in the vocabulary's order, named
    without their scope (`train/loss` -> `loss`)."""
    assert where in SHOWN_IN, where
    order = {metric.pattern: index for index, metric in enumerate(METRICS)}
    picked = [(order[m.pattern], name) for name in metrics if (m := declared(name)) is not None and where in m.shown]
    return {name.split("/", 1)[-1]: metrics[name] for _, name in sorted(picked)}


def markdown_table() -> str:
    """The metric table of docs/layout.md."""
    columns = ["metric", "stages", "meaning", "unit", "better"]
    return table([dict(zip(columns, (f"`{m.pattern}`", m.stages, m.meaning, m.unit, m.better))) for m in METRICS],
                 columns)
