"""Evaluation (`stage=eval`): policies answer the same held-out prompts and an independent judge compares them.

The seeds' headline table (base vs SFT vs DPO vs GRPO on the same prompts), made a stage:
- every policy (`stage.policies`: base, a checkpoint folder, `run:<role>` in a pipeline, an MLflow run id)
  samples `samples_per_prompt` responses per held-out prompt with the same seed and sampling settings;
- a judge that training never saw (`stage.judge`: a reward model trained on a split disjoint from the RM
  phase's, or any `AutoModelForSequenceClassification` reward model) scores them, the human reference
  and, beside it, the training reward model (`stage.train_rm`), so reward hacking shows as a gap;
- win rate against the reference and against `stage.baseline` (SFT) with Wilson intervals, the
  length-controlled win rate (AlpacaEval 2; rlhf_exp/evaluation/statistics.py) with a bootstrap interval, sampled KL to
  `stage.kl_reference` per sequence and per token, length, EOS rate, ROUGE-L to the reference, distinct-n,
  and the judges' accuracy on held-out preference pairs;
- a side-by-side table of the first prompts answered by every policy (markdown + an MLflow table), the
  summary table (printed, markdown, MLflow) and a plot of judge win rate against KL.
Nothing trains: `fit` runs the passes above and returns the metrics (`eval/<policy>/<metric>`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from rlhf_exp import stopping
from rlhf_exp.data import load_preference_splits, load_prompt_splits
from rlhf_exp.data.collate import TokenizedSFT
from rlhf_exp.data.formats import data_label
from rlhf_exp.data.tokens import encode_prompt
from rlhf_exp.errors import ConfigError
from rlhf_exp.losses.preference import REFERENCE_FREE_LOSS_TYPES
from rlhf_exp.evaluation.statistics import (accuracy_metrics, interval_text, length_controlled_win_rate, mean_interval,
                                            sampled_kl, wilson_interval, win_rate, win_scores)
from rlhf_exp.evaluation.tables import markdown_table
from rlhf_exp.evaluation.text import distinct_n, rouge_l, words
from rlhf_exp.schema import StageConfig, key, positive
from rlhf_exp.stages.spec import HeldModel, StageMemory, StageRunner, StageSpec, micro_batch, sequence_tokens
from rlhf_exp.stages.toolbox import Toolbox
from rlhf_exp.tracking import Tracker


def chance_warnings(judge_accuracy: dict[str, tuple[float, int]]) -> list[str]:
    """One sentence per judge whose held-out pair accuracy (ties half) is not told apart from a coin (its 95% Wilson interval
    holds 0.5): the win rates it gives carry no information, however many decimals the table prints."""
    lines = []
    for name, (correct, n) in judge_accuracy.items():
        low, high = wilson_interval(correct, n)
        if n and low <= 0.5 <= high:
            lines.append(f"The {name} ranks held-out preference pairs no better than chance ({correct:g}/{n} = "
                         f"{interval_text(correct / n, low, high)}): its scores and win rates below carry no "
                         f"information. Train it longer or on more pairs before reading them.")
    return lines


# what the summary table's figures are, and how they differ from the published methods their names recall
CAPTION = ("Win rates: 95% Wilson intervals. LC = length-controlled win rate, a simplified AlpacaEval 2 (Dubois et "
           "al. 2024): one logistic regression of the win on the length difference, read at equal length (without "
           "AlpacaEval's tanh of standardized lengths or its per-prompt difficulty term), 95% paired bootstrap; not "
           "comparable with AlpacaEval's leaderboard. KL to {kl_reference}: k1, the mean of log pi/pi_ref over each policy's "
           "own answers (nats per answer; per token beside it), unbiased but below zero by chance on few samples, so "
           "with its 95% normal interval: one that holds 0 shows no drift this sample can measure. ROUGE-L: F1 against the "
           "reference, rouge-score with stemming (as the TL;DR papers report it).")

log = logging.getLogger(__name__)

BASE = "base"  # the policy named so is cfg.model itself (no checkpoint)


@dataclass
class EvalConfig(StageConfig):
    # name -> where its weights are: "base" (cfg.model), a checkpoint folder, run:<role>[@best] in a
    # pipeline, or an MLflow run id (its checkpoint_dir tag). Evaluated in this order.
    policies: Any = None  # {name: where}; null: {base: base}
    baseline: Optional[str] = None         # the policy the others are compared with (null: the reference only)
    kl_reference: Optional[str] = None     # the policy KL is measured to (null: no KL)
    judge: Optional[str] = None            # a reward model folder (stage=rm's, or a sequence-classification one)
    train_rm: Optional[str] = None         # the reward model training used, scored beside the judge
    samples_per_prompt: int = key(positive())
    side_by_side: int = key(positive())    # prompts in the side-by-side table
    bootstrap_resamples: int = key(positive())


@dataclass
class Answers:
    """One policy's responses: [prompts x samples], a prompt's samples adjacent."""

    ids: list[list[int]]
    texts: list[str]
    ended: torch.Tensor                      # [N] bool: stopped on a stop token
    logp: torch.Tensor | None = None         # [N] summed log-prob under the policy (sampling temperature)
    reference_logp: torch.Tensor | None = None  # [N] the same under stage.kl_reference
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # judge name -> [N]

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(r) for r in self.ids], dtype=torch.float64)


class Scorer:
    """A reward model as a judge: stage=rm's folders and decoder sequence classifiers (a folder or hub id) through
    RewardModelScorer; an encoder classifier (BERT-like) through its own forward, prompt + response as text."""

    def __init__(self, path: str, device, precision: str, batch_size: int, key: str):
        from rlhf_exp.models.reward import EncoderClassifier
        from rlhf_exp.rewards import RewardModelScorer

        self.device, self.batch_size = device, batch_size
        try:  # stage=rm's folders and decoder classifiers: scored at the EOS, as in training
            self.score = RewardModelScorer(path, batch_size=batch_size, device=str(device), precision=precision,
                                           key=key)
            return
        except EncoderClassifier:
            pass
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.score = self._classifier

    @torch.no_grad()
    def _classifier(self, prompts: Sequence[str], completions: Sequence[str], **_) -> list[float]:
        out: list[float] = []
        for start in stopping.until_stopped(range(0, len(prompts), self.batch_size)):
            texts = [p + c for p, c in zip(prompts[start:start + self.batch_size],
                                           completions[start:start + self.batch_size])]
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
            out += self.model(**batch).logits[:, 0].float().tolist()
        return out


class PolicyEvaluator(StageRunner):
    """`stage=eval`: trains nothing, so it is no Trainer; the toolbox gives it the run's tokenizer, device,
    sampling and scoring."""

    def __init__(self, cfg: DictConfig, tracker: Tracker, run_dir: str | Path, memory_plan=None):
        self.cfg, self.stage, self.tracker, self.run_dir = cfg, cfg.stage, tracker, Path(run_dir)
        self.tools = Toolbox(cfg, tracker)
        self.examples: list | None = None
        self.last_metrics: dict[str, float] = {}

    def prepare(self) -> None:
        """The policies named and the held-out prompts loaded, before the tracker run opens; the policies
        themselves load in `fit`, one at a time."""
        if self.examples is not None:
            return
        stage, data = self.stage, self.cfg.data
        self.policies = dict(stage.policies or {BASE: BASE})
        for role in (stage.baseline, stage.kl_reference):
            if role is not None and role not in self.policies:
                raise ConfigError("stage.baseline" if role == stage.baseline else "stage.kl_reference",
                                  f"{role!r} is not one of stage.policies ({', '.join(self.policies)})")
        self.tools.load_tokenizer()
        _, held_out = load_prompt_splits(data, self.tools.tokenizer, self.cfg.seed, cache_dir=self.cfg.paths.cache_dir)
        held_out = held_out[: stage.eval_examples] if stage.eval_examples else held_out
        self.examples = held_out
        self.prompt_ids = [encode_prompt(ex.prompt, self.tools.tokenizer, data.max_prompt_tokens) for ex in held_out]
        samples = stage.samples_per_prompt
        self.prompts = [ex.prompt for ex in held_out for _ in range(samples)]
        self.references = [ex.completion for ex in held_out for _ in range(samples)]
        self.tracker.set_tags({"data.num_eval": len(held_out), "eval.policies": json.dumps(self.policies)})

    def fit(self) -> dict[str, float]:
        """Every policy's answers, judged and compared; a stop signal ends it at the next batch (a rerun makes it
        whole: an evaluation has no steps to resume)."""
        try:
            return self.evaluate_policies()
        except stopping.PassInterrupted as stop:
            raise stopping.RunStopped(stop.signum, 0, None) from None

    def evaluate_policies(self) -> dict[str, float]:
        self.prepare()
        stage, policies = self.stage, self.policies

        answers = {name: self.answer(name, where) for name, where in policies.items()}
        if stage.kl_reference is not None:
            self.score_under(policies[stage.kl_reference], stage.kl_reference, answers)
        judges = {name: path for name, path in (("judge", stage.judge), ("train_rm", stage.train_rm)) if path}
        reference_scores, pair_accuracy = {}, {}
        for name, path in judges.items():
            reference_scores[name], pair_accuracy[name] = self.judge_all(name, path, answers)
        metrics, rows = self.compare(answers, reference_scores)
        implicit = {name: counts for name, where in policies.items() if (counts := self.dpo_accuracy(name, where))}
        for name, (correct, n) in pair_accuracy.items():
            metrics.update(accuracy_metrics(f"eval/{name}/pair_accuracy", correct, n))
        for name, (correct, n) in implicit.items():
            metrics.update(accuracy_metrics(f"eval/{name}/dpo_implicit_accuracy", correct, n))
        # the headline a sweep over pipelines optimizes: the judge's mean score of the last policy listed
        last = answers[list(policies)[-1]]
        if "judge" in last.scores:
            metrics["eval/judge_score"] = float(last.scores["judge"].mean())
        for line in chance_warnings(pair_accuracy):
            log.warning("%s", line)
        self.last_metrics = dict(metrics)
        self.tracker.log_metrics(metrics, step=0)
        self.write_outputs(answers, rows, reference_scores, {**pair_accuracy, **{
            f"{name} DPO implicit reward ({self.dpo_reference_name(policies, name)} as reference)": counts
            for name, counts in implicit.items()}})
        return dict(metrics)

    # ------------------------------------------------------------------ passes
    def policy_cfg(self, where: str) -> DictConfig:
        model_cfg = OmegaConf.create(OmegaConf.to_container(self.cfg.model, resolve=True))
        if where != BASE:
            model_cfg.init_from = where
            model_cfg.num_layers = None  # a checkpoint holds the layers it was trained with
        return model_cfg

    def load(self, where: str):
        from rlhf_exp.models import load_causal_lm

        model = load_causal_lm(self.policy_cfg(where), self.cfg.paths.cache_dir, self.tools.tokenizer)
        return model.to(self.tools.device).eval()

    @torch.no_grad()
    def answer(self, name: str, where: str) -> Answers:
        """Sample from policy `name`: the same generator seed for every policy, so they differ only by weights."""
        model = self.load(where)
        generator = torch.Generator(device=self.tools.device).manual_seed(self.cfg.seed + 1)
        ids: list[list[int]] = []
        size = self.tools.micro_batch_size("eval")
        samples = self.stage.samples_per_prompt
        for start in stopping.until_stopped(tqdm(range(0, len(self.prompt_ids), size), desc=f"eval: {name} answers",
                                                 unit="batch", leave=False)):
            ids += self.tools.sample(model, self.prompt_ids[start:start + size], samples, generator=generator)
        texts = [self.tools.tokenizer.decode(r, skip_special_tokens=True) for r in ids]
        ended = torch.tensor([bool(r) and r[-1] in self.tools.stop_token_ids for r in ids])
        answers = Answers(ids, texts, ended)
        answers.logp = self.sequence_logps(model, answers.ids, f"eval: {name} log-probs")
        del model
        return answers

    def sequence_logps(self, model, responses: Sequence[Sequence[int]], desc: str) -> torch.Tensor:
        """[N] each response's summed log-prob under `model` at the sampling temperature."""
        prompts = [ids for ids in self.prompt_ids for _ in range(self.stage.samples_per_prompt)]
        items = [TokenizedSFT(list(p), list(r)) for p, r in zip(prompts, responses)]
        return self.item_logps(model, items, float(self.stage.generation.temperature), desc)

    def item_logps(self, model, items: Sequence[TokenizedSFT], temperature: float, desc: str) -> torch.Tensor:
        """[N] each item's summed response log-prob under `model`."""
        def chunk_logps(chunk: list[TokenizedSFT]) -> torch.Tensor:
            logps, mask, _ = self.tools.response_logprobs(model, chunk, temperature)
            return (logps * mask).sum(-1)

        return self.tools.score_in_length_order(model, items, lambda x: len(x.prompt_ids) + len(x.response_ids),
                                                chunk_logps, desc=desc).double()

    def score_under(self, where: str, reference: str, answers: dict[str, Answers]) -> None:
        model = self.load(where)
        for name, answer in answers.items():
            answer.reference_logp = (answer.logp if name == reference else
                                     self.sequence_logps(model, answer.ids, f"eval: {name} under {reference}"))
        del model

    def judge_all(self, judge: str, path: str, answers: dict[str, Answers]) -> tuple[torch.Tensor, tuple[float, int]]:
        """Score every policy's responses and the references with `path`; its accuracy on held-out pairs."""
        scorer = Scorer(path, self.tools.device, str(self.cfg.hardware.precision), self.tools.micro_batch_size("eval"),
                        f"stage.{judge}")
        for name, answer in tqdm(answers.items(), desc=f"eval: {judge} scores", leave=False):
            answer.scores[judge] = torch.tensor(scorer.score(prompts=self.prompts, completions=answer.texts),
                                                dtype=torch.float64)
        references = torch.tensor(scorer.score(prompts=self.prompts, completions=self.references), dtype=torch.float64)
        pairs = self.held_out_pairs()
        prompts = [p.prompt for p in pairs]
        chosen = torch.tensor(scorer.score(prompts=prompts, completions=[p.chosen for p in pairs]))
        rejected = torch.tensor(scorer.score(prompts=prompts, completions=[p.rejected for p in pairs]))
        return references, (float(win_scores(chosen, rejected).sum()), len(pairs))

    def held_out_pairs(self) -> list:
        """The held-out preference pairs (stage.eval_examples of them) the judges and DPO's implicit reward rank."""
        if getattr(self, "_pairs", None) is None:
            _, pairs = load_preference_splits(self.cfg.data, self.tools.tokenizer, self.cfg.seed,
                                              cache_dir=self.cfg.paths.cache_dir)
            self._pairs = pairs[: self.stage.eval_examples] if self.stage.eval_examples else pairs
        return self._pairs

    @staticmethod
    def dpo_reference(where: str) -> str | None:
        """The model a stage=dpo checkpoint started from (its reference), or None when `where` is not one (or was
        trained with a reference-free loss)."""
        from rlhf_exp.checkpoint import saved_config

        if where == BASE:
            return None
        try:
            saved = saved_config(Path(where))
        except (OSError, KeyError, ValueError):
            return None  # a hub model or a folder this project did not write
        stage = saved.get("stage") or {}
        if stage.get("name") != "dpo" or stage.get("loss_type") in REFERENCE_FREE_LOSS_TYPES:
            return None  # SimPO's and ORPO's implicit reward is the policy's own average log-prob: no reference
        return (saved.get("model") or {}).get("init_from") or BASE

    def dpo_reference_name(self, policies: dict, name: str) -> str:
        reference = self.dpo_reference(policies[name])
        same = [other for other, where in policies.items() if where == reference or
                (where != BASE and reference != BASE and Path(where).resolve() == Path(reference).resolve())]
        return same[0] if same else str(reference)

    @torch.no_grad()
    def dpo_accuracy(self, name: str, where: str) -> tuple[float, int] | None:
        """(pairs ranked right, pairs) by DPO's implicit reward log pi(y)/pi_ref(y) (Rafailov et al. 2023; beta > 0
        does not change the ranking) on the held-out pairs, for a policy stage=dpo trained; else None."""
        reference = self.dpo_reference(where)
        if reference is None:
            return None
        from rlhf_exp.data.collate import tokenize_examples

        data = self.cfg.data
        pairs = tokenize_examples(self.held_out_pairs(), self.tools.tokenizer, max_prompt_tokens=data.max_prompt_tokens,
                                  max_response_tokens=data.max_response_tokens, end_id=self.tools.stop_token_ids[-1])
        items = [p.chosen for p in pairs] + [p.rejected for p in pairs]  # [2N]: chosen, then rejected
        log_ratio = torch.zeros(len(items), dtype=torch.float64)
        for sign, path in ((1, where), (-1, reference)):
            model = self.load(path)
            log_ratio += sign * self.item_logps(model, items, 1.0, f"eval: {name} DPO implicit reward").double()
            del model
        n = len(pairs)
        return float(win_scores(log_ratio[:n], log_ratio[n:]).sum()), n  # a tie counts half

    # ------------------------------------------------------------------ numbers
    def compare(self, answers: dict[str, Answers], reference_scores: dict[str, torch.Tensor]):
        """eval/<policy>/<metric> and the summary table's rows."""
        stage = self.stage
        metrics: dict[str, float] = {}
        rows = []
        reference_lengths = torch.tensor([len(self.tools.tokenizer(t, add_special_tokens=False).input_ids) + 1
                                          for t in self.references], dtype=torch.float64)
        for name, answer in answers.items():
            answer_words = [words(t) for t in answer.texts]
            row: dict[str, float | str] = {"policy": name}
            values = {"length": float(answer.lengths.mean()), "eos_rate": float(answer.ended.float().mean()),
                      "rouge_l": rouge_l(answer.texts, self.references),
                      "distinct_1": distinct_n(answer_words, 1), "distinct_2": distinct_n(answer_words, 2)}
            if answer.reference_logp is not None:
                values["kl_k1_seq"], values["kl_k1_token"] = sampled_kl(answer.logp, answer.reference_logp, answer.lengths)
                _, values["kl_k1_seq_ci_low"], values["kl_k1_seq_ci_high"] = mean_interval(
                    answer.logp - answer.reference_logp)
                row["kl_k1_seq"] = interval_text(values["kl_k1_seq"], values["kl_k1_seq_ci_low"],
                                                 values["kl_k1_seq_ci_high"])
            for judge, scores in answer.scores.items():
                values[f"{judge}_score"] = float(scores.mean())
                comparisons = [("reference", reference_scores[judge], reference_lengths)]
                # the training RM beside the judge against the reference only (the table stays readable)
                if stage.baseline is not None and name != stage.baseline and judge == "judge":
                    base = answers[stage.baseline]
                    comparisons.append((stage.baseline, base.scores[judge], base.lengths))
                for other, other_scores, other_lengths in comparisons:
                    wins = win_scores(scores, other_scores)
                    rate = win_rate(wins)
                    lc = length_controlled_win_rate(wins, answer.lengths - other_lengths,
                                                    stage.bootstrap_resamples, self.cfg.seed)
                    prefix = f"{judge}_win_vs_{other}"
                    values.update({prefix: rate[0], f"{prefix}_ci_low": rate[1], f"{prefix}_ci_high": rate[2],
                                   f"{judge}_lc_win_vs_{other}": lc[0], f"{judge}_lc_win_vs_{other}_ci_low": lc[1],
                                   f"{judge}_lc_win_vs_{other}_ci_high": lc[2]})
                    row[f"{judge} win vs {other}"] = interval_text(*rate)
                    row[f"{judge} LC win vs {other}"] = interval_text(*lc)
            for metric, value in values.items():
                metrics[f"eval/{name}/{metric}"] = value
            row.update({k: round(v, 4) for k, v in values.items() if "_win_" not in k and not k.startswith("kl_k1_seq")})
            rows.append(row)
        return metrics, rows

    # ------------------------------------------------------------------ what people look at
    def write_outputs(self, answers: dict[str, Answers], rows: list[dict], reference_scores: dict[str, torch.Tensor],
                      pair_accuracy: dict[str, tuple[float, int]]) -> None:
        folder = self.run_dir / "eval"
        folder.mkdir(parents=True, exist_ok=True)
        # every row's columns: the baseline's own row has no "vs <baseline>" ones, and it may come first
        keys = list(dict.fromkeys(k for row in rows for k in row))
        table = markdown_table(rows, ["policy", *[k for k in keys if " win " in k],
                                      *[k for k in keys if k.endswith("_score")],
                                      "kl_k1_seq", "kl_k1_token", "length", "eos_rate", "rouge_l", "distinct_2"])
        accuracy = "".join(f"\n{name} accuracy on {n} held-out preference pairs: "
                           f"{interval_text(c / n, *wilson_interval(c, n))}" for name, (c, n) in pair_accuracy.items() if n)
        warnings = "".join(f"\n\n**{line}**" for line in chance_warnings(
            {name: counts for name, counts in pair_accuracy.items() if name in ("judge", "train_rm")}))
        summary = (f"# Policies on {len(self.examples)} held-out prompts x {self.stage.samples_per_prompt} samples "
                   f"({data_label(self.cfg.data)}){warnings}\n\n{CAPTION.format(kl_reference=self.stage.kl_reference)}"
                   f"\n\n{table}\n{accuracy}\n")
        side = self.side_by_side(answers, reference_scores)
        (folder / "summary.md").write_text(summary)
        (folder / "side_by_side.md").write_text(side)
        results = {"rows": rows, "samples": self.sample_rows(answers, reference_scores)}
        (folder / "results.json").write_text(json.dumps(results, indent=2, default=float))
        for path in ("summary.md", "side_by_side.md", "results.json"):
            self.tracker.log_artifact(str(folder / path), "eval")
        self.tracker.log_table(results["samples"], "eval/side_by_side.json")
        self.plot(rows, folder)
        print(summary)

    def sample_rows(self, answers: dict[str, Answers], reference_scores) -> list[dict]:
        rows = []
        samples = self.stage.samples_per_prompt
        for i in range(min(self.stage.side_by_side, len(self.examples))):
            row = {"prompt": self.examples[i].prompt[-500:], "reference": self.references[i * samples]}
            for judge, scores in reference_scores.items():
                row[f"reference {judge}"] = round(float(scores[i * samples]), 3)
            for name, answer in answers.items():
                row[name] = answer.texts[i * samples]
                for judge, scores in answer.scores.items():
                    row[f"{name} {judge}"] = round(float(scores[i * samples]), 3)
            rows.append(row)
        return rows

    def side_by_side(self, answers: dict[str, Answers], reference_scores) -> str:
        parts = ["# The same held-out prompts, answered by every policy (first sample; judge scores in brackets)\n"]
        for number, row in enumerate(self.sample_rows(answers, reference_scores), 1):
            judge = next(iter(reference_scores), None)
            parts.append(f"## Prompt {number}\n\n```\n{row['prompt']}\n```\n")
            lines = ["| who | response | " + (f"{judge} |" if judge else ""), "|---|---|" + ("---|" if judge else "")]
            for who in ["reference", *answers]:
                text = row[who].replace("|", "\\|").replace("\n", " ")
                score = row.get(f"{who} {judge}") if who != "reference" else row.get(f"reference {judge}")
                lines.append(f"| {who} | {text} | " + (f"{score} |" if judge else ""))
            parts.append("\n".join(lines) + "\n")
        return "\n".join(parts)

    def plot(self, rows: list[dict], folder: Path) -> None:
        """Judge win rate against the reference, against KL to the KL reference: where each policy sits."""
        from rlhf_exp.evaluation.figures import close, pyplot

        metric = "judge_win_vs_reference"
        points = [(r["policy"], self.last_metrics.get(f"eval/{r['policy']}/kl_k1_seq"),
                   self.last_metrics.get(f"eval/{r['policy']}/{metric}"),
                   self.last_metrics.get(f"eval/{r['policy']}/{metric}_ci_low"),
                   self.last_metrics.get(f"eval/{r['policy']}/{metric}_ci_high")) for r in rows]
        points = [p for p in points if p[1] is not None and p[2] is not None]
        if not points:
            return
        fig, ax = pyplot().subplots(figsize=(6, 4.5))
        for name, kl, rate, low, high in points:
            ax.errorbar([kl], [rate], yerr=[[rate - low], [high - rate]], fmt="o", capsize=4, label=name)
            ax.annotate(name, (kl, rate), textcoords="offset points", xytext=(6, 4))
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xlabel(f"KL to {self.stage.kl_reference} per sequence (sampled, nats)")
        ax.set_ylabel("judge win rate vs the human reference")
        ax.set_title("policies: judge win rate against KL")
        try:
            fig.savefig(folder / "winrate_vs_kl.png", bbox_inches="tight")
            self.tracker.log_figure(fig, "eval/winrate_vs_kl.png")
        finally:
            close(fig)

    def close(self) -> None:
        import gc

        gc.collect()


def check_inputs(cfg: DictConfig) -> None:
    """The judges and the policies' checkpoints are there before the tracker run exists (a hub id is left to
    the loader)."""
    from rlhf_exp.checkpoint_layout import looks_local, weights_folder

    for judge in ("judge", "train_rm"):
        path = cfg.stage.get(judge)
        if path and looks_local(path) and not Path(path).exists():
            raise ConfigError(f"stage.{judge}", f"{path} does not exist (a reward model folder, or a hub id)")
    for name, where in (cfg.stage.get("policies") or {}).items():
        if where != "base" and not (weights_folder(str(where)) / "config.json").is_file():
            raise ConfigError(f"stage.policies.{name}", f"{where} is not a checkpoint folder (no config.json): "
                              "base, a checkpoint folder or run:<role | MLflow run id>")


def memory(cfg: DictConfig) -> StageMemory:
    micro = micro_batch(cfg, "eval")
    prompt, response = sequence_tokens(cfg)
    return StageMemory([HeldModel("policy")], [], kv_cache=(micro, prompt + response),
                       notes=["one policy at a time, then the judges; nothing trains"])


STAGE = StageSpec(name="eval", config=EvalConfig, trainer=PolicyEvaluator, micro_batch="eval", memory=memory,
                  micro_batch_default=8, input_checks=check_inputs, objective=("eval/judge_score", "max"),
                  report_metrics=())
