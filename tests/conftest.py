"""Fixtures and the environment every test runs in; helpers several test files use are in tests/helpers/."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # tests/test_export.py reads rewards with TRL's code


@pytest.fixture(scope="session")
def tokenizer():
    from rlhf_exp.config import compose_config
    from rlhf_exp.models import load_tokenizer

    cfg = compose_config(["model=tiny"])
    return load_tokenizer(cfg.model, cfg.paths.cache_dir)
