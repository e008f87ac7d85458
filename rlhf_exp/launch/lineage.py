"""Where a run's inputs come from: `run:` references in a config and the lineage tags they leave.

A config value `run:<role>` (in a pipeline: its stage of that role, e.g. `model.init_from: run:sft`) or
`run:<MLflow run id>` names that run's checkpoint; `@best` / `@last` picks which (`run:sft@best`; default
last, the final checkpoint). Resolved before the config is checked, so a reference to nothing stops the
launch naming the key; each resolved reference becomes tags on the run (`init_from`, `init_from_run_id`
for model.init_from, `input.<key>` / `input.<key>.run_id` for any other key).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, read_write

from rlhf_exp.checkpoint_layout import BEST, FINAL, WHICH, checkpoints_of
from rlhf_exp.errors import ConfigError

PREFIX = "run:"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Source:
    """A finished run a reference can name: its folder and its MLflow run id."""

    run_dir: Path
    run_id: str | None = None


@dataclass(frozen=True)
class Reference:
    key: str          # the config key, e.g. model.init_from
    text: str         # as written: run:sft@best
    folder: Path      # the checkpoint folder it resolved to
    run_id: str | None


def string_leaves(node: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, value) of every string in a plain container."""
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in string_leaves(v, f"{prefix}{k}.")]
    if isinstance(node, list):
        return [leaf for i, v in enumerate(node) for leaf in string_leaves(v, f"{prefix}{i}.")]
    return [(prefix[:-1], node)] if isinstance(node, str) else []


def checkpoint_of(source: Source, which: str, key: str, text: str) -> Path:
    folder = checkpoints_of(source.run_dir) / WHICH[which]
    if not folder.is_dir():
        hint = " (stage.keep_best=true keeps one)" if which == "best" else ""
        raise ConfigError(key, f"{text}: {folder} does not exist{hint}")
    return folder


def mlflow_source(run_id: str, tracking: DictConfig, root_dir: str, key: str) -> Source:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from rlhf_exp.tracking.mlflow_tracker import tracking_uri

    try:
        run = MlflowClient(tracking_uri(tracking, root_dir)).get_run(run_id)
    except MlflowException:
        raise ConfigError(key, f"run:{run_id}: no such MLflow run in {tracking_uri(tracking, root_dir)}") from None
    if "run_dir" not in run.data.tags:
        raise ConfigError(key, f"run:{run_id} has no run_dir tag: not a run of this project")
    return Source(Path(run.data.tags["run_dir"]), run_id)


def resolve_references(cfg: DictConfig, roles: dict[str, Source], tracking: DictConfig | None = None,
                       root_dir: str = "") -> list[Reference]:
    """Replace every `run:` value in `cfg` (in place) by the checkpoint folder it names; `roles` are the
    pipeline's finished stages. Returns what was resolved."""
    found: list[Reference] = []
    for key, text in string_leaves(OmegaConf.to_container(cfg, resolve=True)):
        if not text.startswith(PREFIX):
            continue
        target, _, which = text[len(PREFIX):].partition("@")
        which = which or "last"
        if which not in WHICH:
            raise ConfigError(key, f"{text}: @{which} is not a checkpoint choice (@last, @best)")
        if target in roles:
            source = roles[target]
        elif _RUN_ID.match(target) and tracking is not None:
            source = mlflow_source(target, tracking, root_dir, key)
        else:
            known = f" (this pipeline's stages so far: {', '.join(roles)})" if roles else ""
            raise ConfigError(key, f"{text} names no finished stage of a pipeline{known} and no MLflow run id")
        folder = checkpoint_of(source, which, key, text)
        with read_write(cfg):
            OmegaConf.update(cfg, key, str(folder), merge=False)
        found.append(Reference(key, text, folder, source.run_id))
    return found


def lineage_tags(cfg: DictConfig, references: list[Reference]) -> dict[str, str]:
    """Tags saying where the run's inputs came from (model.init_from's also when given as a folder)."""
    tags: dict[str, str] = {}
    init_from = OmegaConf.select(cfg, "model.init_from")
    if init_from:
        tags["init_from"] = str(init_from)
        tags.update(init_from_run_id(Path(init_from)))
    for ref in references:
        name = "init_from" if ref.key == "model.init_from" else f"input.{ref.key}"
        tags[name] = str(ref.folder)
        if ref.run_id:
            tags[f"{name}_run_id" if name == "init_from" else f"{name}.run_id"] = ref.run_id
    return tags


def init_from_run_id(folder: Path) -> dict[str, str]:
    """The MLflow run that wrote checkpoint `folder` (<run>/checkpoints/<name>: <run>/tracking.json)."""
    from rlhf_exp.tracking.records import run_id_of

    run_id = run_id_of(folder.parent.parent)
    return {"init_from_run_id": run_id} if run_id else {}


def checkpoint_model_name(folder: str | Path) -> str | None:
    """The model a checkpoint holds, by name: `model.name` of the run that wrote it (its run_config.json; that run
    named it the same way), else the folder's own name; None when there is no model there."""
    from rlhf_exp.checkpoint import saved_config
    from rlhf_exp.checkpoint_layout import weights_folder

    folder = Path(folder)
    if not (weights_folder(folder) / "config.json").is_file():
        return None
    try:
        return str(saved_config(folder)["model"]["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return folder.name if folder.name not in (FINAL, BEST) else folder.parent.parent.name
