"""Checkpoints: a folder that loads as a Hugging Face model, with `trainer_state.pt` beside it.

A checkpoint is written into `<folder>.partial` and renamed into place, so a run that dies mid-write
leaves the previous checkpoint whole. Sharded models are gathered whole first (every rank takes
part), so a sharded run's model folder loads anywhere.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from rlhf_exp import distributed
from rlhf_exp.engine import Engine
from rlhf_exp.errors import ConfigError, DiskFullError, is_disk_full

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"


def staging_folder(folder: Path) -> Path:
    return folder.with_name(folder.name + ".partial")


@contextmanager
def written_into_place(folder: Path) -> Iterator[Path]:
    """Yields `<folder>.partial` to write into and renames it to `folder` when the block ends, so a run
    that dies mid-write leaves the previous `folder` whole. A failed write removes the partial folder
    (a full disk is then reported in one line, with the space left)."""
    staging = staging_folder(folder)
    staging.mkdir(parents=True, exist_ok=True)
    try:
        yield staging
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(error):
            raise DiskFullError(folder, shutil.disk_usage(folder.parent).free) from error
        raise
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)


def save(folder: Path, *, model: torch.nn.Module, tokenizer, engine: Engine,
         trainer_state: Callable[[dict], dict[str, Any]], extra_files: Callable[[Path], None]) -> Path:
    """Model + tokenizer + trainer_state.pt (+ the stage's `extra_files(staging)`), written on rank 0.
    `trainer_state(engine_state)` builds the state dict once the engine's state is gathered."""
    staging = staging_folder(folder)
    if distributed.is_main():
        if staging.exists():  # left by a run that died mid-write
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    model_state = engine.model_state()
    engine_state = engine.state_dict()
    engine.save_partitions(staging)
    if not distributed.is_main():
        return folder
    with written_into_place(folder) as staging:
        if model_state is None:
            model.save_pretrained(staging, safe_serialization=True)
        else:
            distributed.save_gathered(model, staging, model_state)
        tokenizer.save_pretrained(staging)
        extra_files(staging)
        torch.save(trainer_state(engine_state), staging / TRAINER_STATE)
    log.info("checkpoint: %s", folder)
    return folder


def load_trainer_state(folder: Path) -> dict[str, Any]:
    path = folder / TRAINER_STATE
    if not path.is_file():
        raise ConfigError("stage.resume_from", f"{folder} is not a checkpoint of this project (no {TRAINER_STATE})")
    return torch.load(path, map_location="cpu", weights_only=False)
