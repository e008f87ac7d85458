"""Fixtures and the environment every test runs in; helpers several test files use are in tests/helpers/."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # tests/test_export.py reads rewards with TRL's code
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs tests side by side (pytest -n): one OpenMP thread per test process and the runs it
    # starts, else two tests' thread pools fight over the cores and steps run 10-40x slower
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    from rlhf_exp.config import compose_config
    from rlhf_exp.models import load_tokenizer

    cfg = compose_config(["model=tiny"])
    return load_tokenizer(cfg.model, cfg.paths.cache_dir)
