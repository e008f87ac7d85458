"""A sweep's comparison, from MLflow alone: `python -m rlhf_exp.report <parent run id | sweep folder>`.

Writes `report.md` (one row a job: its swept values, the objective, final and best held-out metrics, time)
and PNG plots: each of the stage's report metrics against the swept value (with the 95% interval where
the metric has one), the stage's trade-off (grpo / ppo: reward against KL, a point per job and its path
through training), and every job's curves on one set of axes. They are logged to the parent run under
`report/` and their folder printed. Which metrics a stage reports is in its StageSpec.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_exp.config import output_root
from rlhf_exp.redact import uri_with_password
from rlhf_exp.launch.jobs import SWEEP_RECORD, best_with_ties, short_label
from rlhf_exp.tracking.records import PARENT_TAG
from rlhf_exp.evaluation.figures import draw_curves, pyplot
from rlhf_exp.evaluation.tables import markdown_table
from rlhf_exp.vocabulary import label

log = logging.getLogger(__name__)

@dataclass
class Job:
    run_id: str
    name: str
    status: str
    swept: dict[str, str]
    final: dict[str, float]
    minutes: float | None
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def best(self, metric: str, direction: str) -> tuple[float, int] | None:
        points = self.history.get(metric)
        if not points:
            return None
        step, value = (max if direction == "max" else min)(points, key=lambda p: p[1])
        return value, step


@dataclass
class Sweep:
    parent_run_id: str
    stage: str
    keys: list[str]        # the swept keys, in the order the sweep named them
    objective: str
    direction: str
    jobs: list[Job]
    report_metrics: list[str] = field(default_factory=list)  # the stage's, then sweep.report_metrics
    tradeoffs: list[tuple[str, str]] = field(default_factory=list)  # the stage's, then sweep.tradeoffs


# the parent run's tag holding the sweep's sweep.report_metrics and sweep.tradeoffs (JSON)
REPORT_TAG = "report_extra"


def interval_of(metric: str) -> tuple[str, str]:
    """The names of `metric`'s 95% interval ends: <metric>_ci_low / _ci_high, or for a reward function's mean
    (eval/rewards/<function>/mean) eval/rewards/<function>/ci_low / ci_high."""
    if metric.endswith("/mean"):
        base = metric[: -len("/mean")]
        return f"{base}/ci_low", f"{base}/ci_high"
    return f"{metric}_ci_low", f"{metric}_ci_high"


def as_number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def load_sweep(client, parent_run_id: str) -> Sweep:
    """The parent run's sweep settings and each child's results, read back from MLflow."""
    from rlhf_exp.stages import stage_spec

    parent = client.get_run(parent_run_id)
    params, stage = parent.data.params, parent.data.tags.get("stage", "sft")
    keys = [name[len("space."):] for name in params if name.startswith("space.")]
    objective = params.get("objective") or stage_spec(stage).objective[0]
    direction = params.get("direction") or stage_spec(stage).objective[1]
    spec, extra = stage_spec(stage), json.loads(parent.data.tags.get(REPORT_TAG) or "{}")
    report_metrics = list(dict.fromkeys([*spec.report_metrics, *extra.get("report_metrics", [])]))
    tradeoffs = list(dict.fromkeys([*([spec.tradeoff] if spec.tradeoff else []),
                                    *(tuple(pair) for pair in extra.get("tradeoffs", []))]))
    wanted = {objective, *report_metrics, *(m for pair in tradeoffs for m in pair), *spec.trainer.curve_metrics}
    children = client.search_runs([parent.info.experiment_id], max_results=10_000,
                                  filter_string=f"tags.{PARENT_TAG} = '{parent_run_id}'",
                                  order_by=["attributes.start_time ASC"])
    jobs = []
    for run in sorted(children, key=lambda r: int(r.data.tags.get("sweep_job", 0))):
        swept = {key: run.data.params.get(key, run.data.params.get(key.split("/")[-1], "?")) for key in keys}
        for key in keys:  # a config group swept (dpo_loss=...) is not a param: read it from the overrides tag
            if swept[key] == "?":
                for override in run.data.tags.get("overrides", "").split():
                    if override.lstrip("+~").split("=", 1)[0] == key:
                        swept[key] = override.split("=", 1)[1]
        end = run.info.end_time or run.info.start_time
        minutes = (end - run.info.start_time) / 60_000 if run.info.start_time else None
        history = {name: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
                   for name in wanted if name in run.data.metrics}
        jobs.append(Job(run.info.run_id, run.info.run_name, run.info.status, swept, dict(run.data.metrics),
                        minutes, history))
    return Sweep(parent_run_id, stage, keys, objective, direction, jobs, report_metrics, tradeoffs)


def sweep_table(sweep: Sweep) -> str:
    """A row per job: its swept values, the objective's final and best value, the stage's report metrics."""
    shown = [m for m in sweep.report_metrics if m != sweep.objective]
    header = ["job", "status", *[short_label(k) for k in sweep.keys], f"{sweep.objective} (final)",
              "best (step)", *[f"{m} (final)" for m in shown], "minutes"]
    rows = []
    for job in sweep.jobs:
        best = job.best(sweep.objective, sweep.direction)
        rows.append(dict(zip(header, [job.name, job.status, *[job.swept.get(k, "") for k in sweep.keys],
                                      job.final.get(sweep.objective), f"{best[0]:.4g} ({best[1]})" if best else "",
                                      *[job.final.get(m) for m in shown], job.minutes])))
    return markdown_table(rows, header)


def x_positions(sweep: Sweep, jobs: list[Job], key: str) -> tuple[list[float], list[str] | None]:
    """Numbers when every value of `key` is one, else categories in the order first seen."""
    numbers = [as_number(j.swept.get(key)) for j in jobs]
    if all(n is not None for n in numbers):
        return numbers, None
    order = list(dict.fromkeys(j.swept.get(key, "?") for j in jobs))
    return [float(order.index(j.swept.get(key, "?"))) for j in jobs], order


NEAR_EQUAL = 0.05  # a metric whose jobs' values all lie within 5% of each other is drawn from zero, and says so


def swept_figure(sweep: Sweep, metrics: list[str]):
    """Each metric's final value against the first swept key; a line per value of the other keys."""
    plt = pyplot()

    key = sweep.keys[0]
    done = [j for j in sweep.jobs if j.status == "FINISHED"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 4), dpi=110, squeeze=False)
    groups: dict[str, list[Job]] = defaultdict(list)
    for job in done:
        groups[", ".join(f"{short_label(k)}={job.swept.get(k)}" for k in sweep.keys[1:])].append(job)
    for ax, metric in zip(axes[0], metrics):
        for group, jobs in groups.items():
            jobs = [j for j in jobs if metric in j.final]
            if not jobs:
                continue
            xs, categories = x_positions(sweep, jobs, key)
            order = sorted(range(len(jobs)), key=lambda i: xs[i])
            xs, ys = [xs[i] for i in order], [jobs[i].final[metric] for i in order]
            low_name, high_name = interval_of(metric)
            low = [jobs[i].final.get(low_name) for i in order]
            high = [jobs[i].final.get(high_name) for i in order]
            if all(v is not None for v in low + high):
                errors = [[y - lo for y, lo in zip(ys, low)], [hi - y for y, hi in zip(ys, high)]]
                ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=4, label=group or "95% interval")
            else:
                ax.plot(xs, ys, marker="o", label=group or None)
                spread, scale = max(ys) - min(ys), max(abs(y) for y in ys)
                if len(ys) > 1 and scale and spread / scale < NEAR_EQUAL and (min(ys) >= 0 or max(ys) <= 0):
                    # an automatic axis would stretch these to fill the panel and noise would look like an effect
                    ax.set_ylim(*((0, max(ys) * 1.15) if min(ys) >= 0 else (min(ys) * 1.15, 0)))
                    ax.text(0.5, 0.5, f"all within {spread / scale:.1%} of each other", transform=ax.transAxes,
                            ha="center", fontsize=9, color="0.35")
            if categories:
                ax.set_xticks(range(len(categories)), categories)
            elif min(xs) > 0 and max(xs) / min(xs) >= 10:
                ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(label(metric))
        ax.set_title(f"{label(metric).split(' (')[0]} vs {short_label(key)}", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{sweep.stage} sweep over {', '.join(sweep.keys)}: final held-out values "
                 f"({len(done)} finished jobs)", fontsize=11)
    fig.tight_layout()
    return fig


def tradeoff_figure(sweep: Sweep, x_metric: str, y_metric: str):
    """y against x: each job's path through its evaluations, its final point labelled."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4.8), dpi=110)
    for i, job in enumerate(j for j in sweep.jobs if j.status == "FINISHED"):
        xs, ys = dict(job.history.get(x_metric, [])), dict(job.history.get(y_metric, []))
        steps = sorted(set(xs) & set(ys))
        if not steps:
            continue
        tag = " ".join(f"{short_label(k)}={v}" for k, v in job.swept.items()) or job.name
        ax.plot([xs[s] for s in steps], [ys[s] for s in steps], marker=".", color=f"C{i}", alpha=0.5)
        ax.scatter([xs[steps[-1]]], [ys[steps[-1]]], s=60, color=f"C{i}", label=f"{tag} (final)", zorder=3)
    ax.set_xlabel(label(x_metric))
    ax.set_ylabel(label(y_metric))
    ax.set_title(f"{sweep.stage}: {label(y_metric).split(' (')[0]} against {label(x_metric).split(' (')[0]}"
                 " through training", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def tradeoff_name(pair: tuple[str, str]) -> str:
    """eval/accuracy vs train/generated_tokens -> accuracy_vs_generated_tokens (a file name)."""
    x, y = (m.rstrip("/").replace("/mean", "").rsplit("/", 1)[-1] for m in pair)
    return f"{y}_vs_{x}"


def sweep_curves_figure(sweep: Sweep, metrics: list[str]):
    """Every job's curve of each metric on one set of axes (a job that did not finish dotted)."""
    fig, axes = pyplot().subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), dpi=110, squeeze=False)
    series = [str(i) for i in range(len(sweep.jobs))]
    styles = {key: {"linestyle": "-" if job.status == "FINISHED" else ":", "color": f"C{i}",
                    "label": job.name if job.status == "FINISHED" else f"{job.name} ({job.status.lower()})"}
              for i, (key, job) in enumerate(zip(series, sweep.jobs))}
    for ax, metric in zip(axes[0], metrics):
        history = {key: job.history.get(metric) for key, job in zip(series, sweep.jobs)}
        draw_curves(ax, history, series, styles=styles, legend_size=8)
        ax.set_ylabel(label(metric))
    fig.suptitle(f"{sweep.stage} sweep: every job's curves", fontsize=11)
    fig.tight_layout()
    return fig


def write_report(client, parent_run_id: str, out_dir: Path) -> Path:
    """report.md and the PNGs of the sweep whose parent is `parent_run_id`, in `out_dir`; returns it."""
    from rlhf_exp.stages import stage_spec
    from rlhf_exp.evaluation.figures import close

    sweep = load_sweep(client, parent_run_id)
    spec = stage_spec(sweep.stage)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = list(dict.fromkeys([sweep.objective, *sweep.report_metrics]))
    present = [m for m in metrics if any(m in j.final for j in sweep.jobs)]
    figures = {}
    if sweep.keys and present:
        figures[f"{short_label(sweep.keys[0])}_vs_metrics.png"] = swept_figure(sweep, present)
    drawn = [pair for pair in sweep.tradeoffs if all(any(m in j.history for j in sweep.jobs) for m in pair)]
    for k, pair in enumerate(drawn):  # the stage's own is tradeoff.png
        name = "tradeoff.png" if k == 0 and spec.tradeoff == pair else f"tradeoff_{tradeoff_name(pair)}.png"
        figures[name] = tradeoff_figure(sweep, *pair)
    curves = [m for m in (*spec.trainer.curve_metrics[:1], sweep.objective) if any(m in j.history for j in sweep.jobs)]
    if curves:
        figures["curves.png"] = sweep_curves_figure(sweep, list(dict.fromkeys(curves)))
    for name, figure in figures.items():
        figure.savefig(out_dir / name)
        close(figure)
    finished = sum(j.status == "FINISHED" for j in sweep.jobs)
    scored = [j for j in sweep.jobs if j.status == "FINISHED" and sweep.objective in j.final]
    best, tied = best_with_ties(scored, lambda j: j.final[sweep.objective], sweep.direction)
    verdict = f" Best: **{best.name}**, {best.final[sweep.objective]:.4g}." if best else ""
    if len(tied) > 1:
        verdict = (f" **Tied:** {', '.join(j.name for j in tied)} all reach {best.final[sweep.objective]:.4g}; no job "
                   f"is better than the others on this objective (the first, {best.name}, is tagged best).")
    lines = [f"# {sweep.stage} sweep over {', '.join(sweep.keys) or 'nothing'}", "",
             f"Parent MLflow run `{parent_run_id}`: {len(sweep.jobs)} jobs, {finished} finished, "
             f"{len(sweep.jobs) - finished} not. Objective: `{sweep.objective}` ({sweep.direction}).{verdict}", "",
             sweep_table(sweep), ""]
    lines += [f"![{name}]({name})" for name in figures]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    (out_dir / "jobs.json").write_text(json.dumps([{"run_id": j.run_id, "name": j.name, "status": j.status,
                                                    "swept": j.swept, "final": j.final, "minutes": j.minutes}
                                                   for j in sweep.jobs], indent=2))
    return out_dir


def parent_and_uri(target: str, tracking_uri: str | None) -> tuple[str, str, Path | None]:
    """(parent run id, tracking URI, sweep folder or None) of a sweep folder or a parent run id."""
    folder = Path(target)
    if (folder / SWEEP_RECORD).is_file():
        record = json.loads((folder / SWEEP_RECORD).read_text())
        # a sweep that started its own server (sweep.server) kept its runs in store_uri once it stopped
        return (record["parent_run_id"], tracking_uri or uri_with_password(record.get("store_uri") or
                                                                             record["tracking_uri"]), folder)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{output_root() / 'mlflow.db'}"
    return target, uri, None


def main(argv: list[str] | None = None) -> int:
    from mlflow.tracking import MlflowClient

    parser = argparse.ArgumentParser(prog="python -m rlhf_exp.report", description=__doc__.split("\n")[0])
    parser.add_argument("target", help="a sweep folder (multiruns/<id>) or the sweep's parent MLflow run id")
    parser.add_argument("--tracking-uri", help="default: the sweep folder's, else $MLFLOW_TRACKING_URI, else "
                                               "mlflow.db in this folder (or $RLHF_EXP_ROOT)")
    parser.add_argument("--out", type=Path, help="default: <sweep folder>/report")
    args = parser.parse_args(argv)
    parent_id, uri, folder = parent_and_uri(args.target, args.tracking_uri)
    client = MlflowClient(uri)
    if folder is None:
        tagged = client.get_run(parent_id).data.tags.get("sweep_dir")
        folder = Path(tagged) if tagged else Path("reports") / parent_id
    out = write_report(client, parent_id, args.out or folder / "report")
    for path in sorted(out.iterdir()):
        client.log_artifact(parent_id, str(path), "report")
    print(f"report: {out / 'report.md'} ({', '.join(p.name for p in sorted(out.glob('*.png')))}); "
          f"logged to run {parent_id} under report/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
