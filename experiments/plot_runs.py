"""Curves of MLflow runs as a PNG, for the write-ups.

python experiments/plot_runs.py OUT.png RUN_ID[,RUN_ID...] METRIC [METRIC ...] [--title T] [--uri sqlite:///mlflow.db]
Several runs: one line per run and metric, labelled by run name. A `<x>/mean` metric with `<x>/ci_low` and
`<x>/ci_high` logged (a 0/1 reward's Wilson interval) gets its interval as a band.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlflow.tracking import MlflowClient

from rlhf_exp.evaluation.figures import close, curves_figure
from rlhf_exp.vocabulary import current_name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("runs")
    parser.add_argument("metrics", nargs="+")
    parser.add_argument("--title", default="")
    parser.add_argument("--uri", default=f"sqlite:///{Path(__file__).resolve().parent.parent / 'mlflow.db'}")
    args = parser.parse_args()
    client = MlflowClient(args.uri)
    run_ids = args.runs.split(",")
    history, names = {}, []
    for run_id in run_ids:
        label = client.get_run(run_id).info.run_name if len(run_ids) > 1 else ""
        for metric in args.metrics:
            name = f"{label}: {metric}" if label else metric
            # a run logged before a rename has the old name; today's runs the current one (vocabulary.RENAMED)
            points = client.get_metric_history(run_id, metric) or client.get_metric_history(run_id, current_name(metric))
            history[name] = [(m.step, m.value) for m in points]
            names.append(name)
            if metric.endswith("/mean"):  # its 95% interval, drawn as a band where the run logged one
                for side in ("ci_low", "ci_high"):
                    history[f"{name.removesuffix('/mean')}/{side}"] = [
                        (m.step, m.value) for m in client.get_metric_history(run_id, f"{metric.removesuffix('/mean')}/{side}")]
    fig = curves_figure(history, names, args.title)
    try:
        fig.savefig(args.out, dpi=110)
    finally:
        close(fig)
    print(args.out)


if __name__ == "__main__":
    main()
