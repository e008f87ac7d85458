"""Nobody else's code runs (issue 11.6): crafted checkpoints and config targets are refused."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch

from helpers import GRPO, TINY, run_cli, seeded_cache, tracked_env


class _RunsCode:
    """Unpickling this runs os.system: what a crafted file carries."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_whose_trainer_state_would_run_code_is_refused_unrun(tmp_path):
    """Before: trainer_state.pt was read with torch.load(weights_only=False), so resuming ran its code."""
    from rlhf_exp.checkpoint import TRAINER_STATE, load_trainer_state
    from rlhf_exp.errors import ConfigError

    marker = tmp_path / "code-ran"
    torch.save({"step": 3, "engine": _RunsCode(marker)}, tmp_path / TRAINER_STATE)
    with pytest.raises(ConfigError, match="stage.resume_from.*objects other than tensors"):
        load_trainer_state(tmp_path)
    assert not marker.exists()


def test_the_trainer_state_this_project_writes_loads_with_weights_only(tmp_path):
    """Every stream a resume restores (numpy's too) is kept as tensors and plain values."""
    import random

    import numpy as np

    from rlhf_exp.runtime import rng_state, set_rng_state

    torch.save({"rng": rng_state()}, tmp_path / "state.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "state.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_config_target_outside_the_allowed_modules_is_refused_before_anything_runs(tmp_path):
    """Before: reward.fn._target_=torch.load with a pickle ran its code through the CLI (Hydra's own
    blocklist stops os.system and builtins.eval, not this)."""
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "reward.pkl"
    crafted.write_bytes(pickle.dumps(_RunsCode(marker)))
    done = run_cli(*TINY, *GRPO, "reward.fn._target_=torch.load", "~reward.fn.target_tokens",
                   f"+reward.fn.f={crafted}", "+reward.fn.weights_only=false", env=tracked_env(tmp_path))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "config key `reward.fn._target_`: 'torch.load' is outside the modules" in done.stderr
    assert "allowed_targets=[torch]" in done.stderr  # how to allow it on purpose
    assert "Traceback" not in done.stderr
    assert not marker.exists()
    assert shutil.which("touch")  # (the marker would have been written had the pickle been loaded)


def test_allowed_targets_lets_a_named_module_run_and_only_it():
    from rlhf_exp.errors import ConfigError
    from rlhf_exp.factory import check_targets

    cfg = {"reward": {"fn": {"_target_": "mypackage.rewards.score"}}, "x": [{"_target_": "rlhf_exp.rewards.f"}]}
    check_targets(cfg, ["mypackage.rewards"])
    with pytest.raises(ConfigError, match="reward.fn._target_"):
        check_targets(cfg, ["mypackage.rew"])  # a prefix is a whole module path, not any string start
    with pytest.raises(ConfigError, match=r"x\[0\]._target_"):
        check_targets({"x": [{"_target_": "os.system"}]}, [])


def test_secrets_in_config_values_are_written_nowhere(tmp_path):
    """Before: +model.hub_token=... (or ${oc.env:HF_TOKEN}) was stored verbatim in MLflow params, the config
    artifact, trainer_state.pt and .hydra/. Every file the run leaves (the SQLite database included) is read."""
    api_key = "sk-" + "a1B2" * 10
    env_token = "hf_" + "Zx9Q" * 9
    password = "pa55-w0rd-x"
    unused_env = "hf_" + "Un5e" * 9  # in the environment, named by nothing: must stay out as before
    done = run_cli("-m", *TINY, "stage.max_steps=1", "stage.num_samples=0",
                   f"+reward.fn.api_key={api_key}", "+reward.fn.note=${oc.env:JUDGE_TOKEN}",
                   f"+reward.fn.endpoint=https://user:{password}@judge.example/v1",
                   env={**tracked_env(tmp_path), "RLHF_EXP_MULTIRUNS_DIR": str(tmp_path / "multi"),
                        "JUDGE_TOKEN": env_token, "HF_TOKEN": unused_env})
    assert done.returncode == 0, done.stderr[-3000:]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    written = {p.relative_to(tmp_path).as_posix() for p in files}
    assert any(name.endswith(".hydra/overrides.yaml") for name in written)
    assert any(name.endswith("multirun.yaml") for name in written)
    assert any(name.endswith("trainer_state.pt") for name in written)
    assert any("mlartifacts" in name and name.endswith("config.yaml") for name in written)
    for path in files:
        content = path.read_bytes()
        for secret in (api_key, env_token, password, unused_env):
            assert secret.encode() not in content, f"{secret} written to {path}"
    from helpers import mlflow_runs

    _, runs = mlflow_runs(tmp_path / "m.db")
    [parent] = [r for r in runs if r.data.tags.get("rlhf_exp.role") == "sweep"]
    [run] = [r for r in runs if r is not parent]
    assert "+reward.fn.api_key=***redacted***" in parent.data.tags["overrides"].split()
    assert run.data.params["reward.fn.api_key"] == "***redacted***"
    assert run.data.params["reward.fn.endpoint"] == "https://user:***redacted***@judge.example/v1"
    assert run.data.params["stage.max_steps"] == "1"  # the rest as it was


def test_a_metric_or_a_kind_of_token_is_no_secret_and_a_credential_still_is():
    """Before: `make run`'s closing line printed `eval/sft/kl_token=***redacted***` (a KL per token, hidden as
    if it were a credential)."""
    from rlhf_exp.redact import is_secret_key, redact_text

    assert redact_text("finished: eval/sft/kl_seq=0.01, eval/sft/kl_token=0.002") == \
        "finished: eval/sft/kl_seq=0.01, eval/sft/kl_token=0.002"
    for plain in ("eval/sft/kl_token", "eval/sft/kl_k1_token", "pad_token_id", "model.eos_token", "max_new_tokens", "per_token"):
        assert not is_secret_key(plain), plain
    for secret in ("hub_token", "HF_TOKEN", "model.hub_token", "api_key", "access_token", "token", "auth_token"):
        assert is_secret_key(secret), secret
    assert redact_text("hub_token=abc123") == "hub_token=***redacted***"


def test_compose_publishes_the_unauthenticated_mlflow_server_on_loopback_only():
    """Before: ports ["5000:5000"] published it on every host interface, without authentication."""
    import yaml

    from helpers import ROOT

    services = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]
    published = [(name, port) for name, service in services.items() for port in service.get("ports", [])]
    assert published, "the UI is reachable from the host"
    for name, port in published:
        assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond the host's loopback"


def test_secrets_planted_everywhere_reach_no_byte_under_the_project_and_no_console(tmp_path):
    """Before: the password of MLFLOW_TRACKING_URI=http://user:pw@host was written in clear text to
    rlhf_exp.log, tracking.json, the uploaded log artifact and the console, and a launch refused for a bad
    key left its value in that run's .hydra/*.yaml (redaction ran only once a run started). Planted: a
    token in the environment, a password in the tracking URI, a token in an override of a refused launch
    and a token in a data path; then every file under the project (runs, the server's database and
    artifacts, the cache) and everything both launches printed is read."""
    import json

    from rlhf_exp.tracking.server import MlflowServer, free_port

    password = "pw-" + "Qz7" * 6
    env_token = "hf_" + "Ev1r" * 9
    override_token = "hf_" + "0vRd" * 9
    path_token = "hf_" + "PaTh" * 9
    port = free_port()
    server = MlflowServer(f"sqlite:///{tmp_path / 'server.db'}", str(tmp_path / "artifacts"), serve_artifacts=True,
                          port=port)
    try:
        data = tmp_path / "data" / path_token / "rows.jsonl"
        data.parent.mkdir(parents=True)
        data.write_text("".join(json.dumps({"prompt": f"Question {i}?", "completion": f" Answer {i}."}) + "\n"
                                for i in range(16)))
        cache = seeded_cache(tmp_path / "cache")
        env = {"MLFLOW_TRACKING_URI": f"http://alice:{password}@127.0.0.1:{port}", "HF_TOKEN": env_token,
               "RLHF_EXP_RUNS_DIR": str(tmp_path / "runs"), "RLHF_EXP_CACHE_DIR": str(cache)}
        trained = run_cli(*TINY, "data=jsonl", f"data.path={data}", "data.val_size=4", "stage.max_steps=1",
                          "stage.num_samples=0", "hydra.job_logging.root.level=INFO", env=env)
        assert trained.returncode == 0, trained.stderr[-3000:]
        refused = run_cli(*TINY, f"+model.hub_token={override_token}", "stage.max_steps=1", env=env)
        assert refused.returncode == 2 and "model.hub_token" in refused.stderr
    finally:
        server.stop()
    said = trained.stdout + trained.stderr + refused.stdout + refused.stderr
    assert f"http://alice:***redacted***@127.0.0.1:{port}" in said  # the URI was printed, its password hidden
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.relative_to(tmp_path).as_posix() for p in files}
    for expected in ("rlhf_exp.log", "tracking.json", ".hydra/overrides.yaml", "server.db", "config.yaml"):
        assert any(name.endswith(expected) for name in names), expected
    assert sum(name.endswith(".hydra/overrides.yaml") for name in names) == 2  # the refused launch's too
    assert any(name.startswith("artifacts/") and name.endswith("rlhf_exp.log") for name in names)
    print(f"read {len(files)} files:", *sorted(names), sep="\n  ")  # pytest -s: the list the issue asks for
    for secret in (password, env_token, override_token, path_token):
        assert secret not in said, f"{secret} printed"
        for path in files:
            if path_token not in str(path.relative_to(tmp_path)):  # the data file's own folder name
                assert secret.encode() not in path.read_bytes(), f"{secret} written to {path}"
