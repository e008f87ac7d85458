"""Fixtures and the environment every test runs in; helpers several test files use are in tests/helpers/."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # tests/test_export.py reads rewards with TRL's code
# a run's final model is not logged as an MLflow model (a second copy of its weights per run): the tests that
# check it turn it on (tracking.log_model=true)
os.environ.setdefault("RLHF_EXP_LOG_MODEL", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs tests side by side (pytest -n): one OpenMP thread per test process and the runs it
    # starts, else two tests' thread pools fight over the cores and steps run 10-40x slower
    os.environ["OMP_NUM_THREADS"] = "1"
    # a run that asks for more threads (hardware.num_threads) shares the cores with the other test: its idle
    # OpenMP threads sleep instead of spinning (the default spin took a third more CPU under contention)
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    import torch

    torch.set_num_threads(1)


# The files whose tests take longest on 2 cores (--durations), heaviest first: pytest -n hands each worker a
# share of the collected order and lets an idle worker take from the end of another's, so with the slow
# files first the suite ends on short tests instead of one worker finishing a long one alone.
SLOWEST_FIRST = ("test_distributed.py", "test_sweep.py", "test_pipeline.py", "test_planner.py", "test_bench.py",
                 "test_models.py", "test_tracking_outage.py", "test_resume.py", "test_soak.py", "test_mlflow_ui.py",
                 "test_security.py", "test_stopping.py", "test_cli.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests stay in order


def _declared_metrics_only(log_metrics):
    """Every metric a run logs must be declared in rlhf_exp/vocabulary.py: a name outside it fails the test
    that logged it (pytest.fail is a BaseException: no `except Exception` in a run swallows it)."""

    def checked(self, metrics, step):
        from rlhf_exp.vocabulary import declared

        undeclared = sorted(name for name in metrics if declared(name) is None)
        if undeclared:
            pytest.fail(f"metrics not declared in rlhf_exp/vocabulary.py: {undeclared}")
        return log_metrics(self, metrics, step)

    checked.__wrapped__ = log_metrics
    return checked


def _check_metric_names() -> None:
    from rlhf_exp.tracking.base import Tracker
    from rlhf_exp.tracking.mlflow_tracker import MlflowTracker

    for tracker in (Tracker, MlflowTracker):
        if not hasattr(tracker.log_metrics, "__wrapped__"):
            tracker.log_metrics = _declared_metrics_only(tracker.log_metrics)


_check_metric_names()


@pytest.fixture(scope="session")
def tokenizer():
    from rlhf_exp.config import compose_config
    from rlhf_exp.models import load_tokenizer

    cfg = compose_config(["model=tiny"])
    return load_tokenizer(cfg.model, cfg.paths.cache_dir)
