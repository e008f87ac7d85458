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

from setuptools import find_packages

from tests.helpers import ROOT, mlflow_runs

WHEEL_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "conf", "rlhf_exp")


def test_the_wheels_package_list_is_every_package_of_the_source_tree_and_conf():
    """pyproject.toml lists its packages (setuptools' finder cannot add conf/ as rlhf_exp.conf): a subpackage
    added to rlhf_exp/ and not to the list would be missing from every installed copy."""
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert sorted(listed) == sorted(find_packages(str(ROOT), include=["rlhf_exp*"]) + ["rlhf_exp.conf"])


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
    sweep = subprocess.run([bin_dir / "rlhf-exp", "-m", *tiny, "stage.lr=1e-4,2e-4"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=600)
    assert sweep.returncode == 0, sweep.stderr[-3000:]

    assert len(list((work / "runs" / "sft").glob("*/checkpoints/final"))) == 1
    assert len(list((work / "multiruns").glob("*/*/checkpoints/final"))) == 2
    _, runs = mlflow_runs(work / "mlflow.db")
    children = [run for run in runs if run.data.params.get("stage.lr") in ("0.0001", "0.0002")]
    assert len(runs) == 4 and len(children) == 2  # the single run, the sweep's parent and its two jobs
    assert not (tmp_path / "env" / "lib" / "runs").exists()
