"""Load (issue 11): several tiny runs at once lose no run, param or metric value (`make soak`: 50 jobs)."""

from __future__ import annotations

from rlhf_exp.soak import soak


def check(report):
    assert report.ok, "\n".join([report.summary(), *report.failed_jobs, *report.problems])
    assert report.runs == 6 and report.params_expected > 6 * 50 and report.metrics_expected > 6 * 10
    print(f"soak: {report.summary()}")


# (make soak's jobs also sample; here the six are cut to what tracking sees: params, metrics, artifacts)
LIGHTER = ["stage.num_samples=0", "stage.max_steps=2"]


def test_six_jobs_four_at_a_time_against_one_mlflow_server_lose_nothing(tmp_path):
    check(soak(6, 4, tmp_path, extra=LIGHTER))


def test_six_jobs_started_at_once_on_a_new_sqlite_file_lose_nothing(tmp_path):
    """Before: runs started together on a project without mlflow.db crashed in MLflow's migrations."""
    check(soak(6, 6, tmp_path, tracking_uri=f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}", extra=LIGHTER))
