"""Checkpoints: a folder that loads as a Hugging Face model, with `trainer_state.pt` beside it.

A checkpoint is written into `<folder>.partial` and renamed into place, so a run that dies mid-write
leaves the previous checkpoint whole; its `manifest.json` (every file's size and sha256) is written
last, and a resume trusts only a checkpoint whose files still match it (a truncated or overwritten
file sends it to the newest checkpoint that verifies). Sharded models are gathered whole first (every
rank takes part), so a sharded run's model folder loads anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from rlhf_exp import distributed
from rlhf_exp.checkpoint_layout import CHECKPOINTS, FINAL, MANIFEST, RUN_CONFIG, TRAINER_STATE, checkpoints_of
from rlhf_exp.engine import Engine
from rlhf_exp.errors import ConfigError, DiskFullError, is_disk_full

log = logging.getLogger(__name__)


def _look_for_deepspeed_engines_only_once_deepspeed_is_imported() -> None:
    """transformers' `save_pretrained` unwraps the model with accelerate's `extract_model_from_parallel`,
    which imports DeepSpeed whenever it is installed only to test `isinstance(model, DeepSpeedEngine)`: 2 s
    of start-up in every process's first save. No model is a DeepSpeedEngine in a process that never
    imported DeepSpeed, so that test asks this instead (a deepspeed_zero run imports it before it builds
    its engine)."""
    import sys

    import accelerate.utils.other

    accelerate.utils.other.is_deepspeed_available = lambda: "deepspeed" in sys.modules


_look_for_deepspeed_engines_only_once_deepspeed_is_imported()


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
    usual_file_modes(staging)
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)


def usual_file_modes(folder: Path) -> None:
    """Files as the umask makes them (0644 under the usual 022): huggingface_hub writes weights through a private
    temporary file (0600), which left model.safetensors unreadable to anyone else sharing the run folder."""
    mask = os.umask(0)
    os.umask(mask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~mask)


def save(folder: Path, *, model: torch.nn.Module, tokenizer, engine: Engine,
         trainer_state: Callable[[dict], dict[str, Any]], extra_files: Callable[[Path], None],
         training_state: bool = True) -> Path:
    """Model + tokenizer + run_config.json + trainer_state.pt (+ the stage's `extra_files(staging)`), written
    on rank 0. `trainer_state(engine_state)` builds the state dict once the engine's state is gathered.
    training_state=False: no trainer_state.pt (a checkpoint to start from, not to resume)."""
    staging = staging_folder(folder)
    if distributed.is_main():
        if staging.exists():  # left by a run that died mid-write
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    model_state = engine.model_state()
    engine_state = engine.state_dict() if training_state else {}
    if training_state:
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
        state = trainer_state(engine_state)
        if training_state:
            save_torch_file(state, staging / TRAINER_STATE)
        (staging / RUN_CONFIG).write_text(json.dumps(state["config"], indent=1, default=str))
        write_manifest(staging)
    log.info("checkpoint: %s", folder)
    return folder


def save_torch_file(obj: Any, path: Path) -> None:
    """torch.save through a Python file object: a full disk is then an OSError (ENOSPC). Given a path, torch
    writes through its own C++ writer, which reports a full disk as a RuntimeError without an errno
    ("[enforce fail at inline_container.cc] . unexpected pos 704 vs 598")."""
    with open(path, "wb") as file:
        torch.save(obj, file)
        file.flush()


def file_sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def write_manifest(folder: Path) -> None:
    """Every file under `folder` with its size and sha256, in `folder/manifest.json`: written last, so a
    checkpoint whose manifest is there was written whole, and one whose files no longer match it was damaged."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps({"files": entries}, indent=1))


def safetensors_damage(path: Path) -> str | None:
    """Why a .safetensors file cannot be whole (None: its header accounts for every byte)."""
    size = path.stat().st_size
    with path.open("rb") as file:
        start = file.read(8)
        if len(start) < 8:
            return f"{path} is cut off ({size} bytes)"
        header_bytes = int.from_bytes(start, "little")
        if 8 + header_bytes > size:
            return f"{path} is cut off ({size} bytes, its header alone says {8 + header_bytes})"
        try:
            header = json.loads(file.read(header_bytes))
        except ValueError:
            return f"{path} has an unreadable header"
    end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    if 8 + header_bytes + end != size:
        return f"{path} has {size} bytes where its header says {8 + header_bytes + end}"
    return None


def checkpoint_damage(folder: Path) -> str | None:
    """Why `folder` is not a whole checkpoint to resume from (None: it is). With a manifest, every file it lists
    must be there with its size and sha256; a checkpoint written before manifests must have its trainer state
    and safetensors files whose headers account for every byte."""
    if not (folder / TRAINER_STATE).is_file():
        return f"no {TRAINER_STATE} in {folder}"
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return next((why for why in map(safetensors_damage, sorted(folder.rglob("*.safetensors"))) if why), None)
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{manifest} is unreadable"
    for name, written in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != written["size"]:
            return f"{path} has {path.stat().st_size} bytes, {written['size']} were written"
        if file_sha256(path) != written["sha256"]:
            return f"{path} is not what was written (its sha256 differs)"
    return None


def prune_step_checkpoints(checkpoints: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` whole step_* checkpoints in `checkpoints` (final and best are never
    touched; a half-written .partial folder is left to the next save, which clears it). Returns the deleted."""
    steps = sorted(c for c in checkpoints.glob("step_*") if not c.name.endswith(".partial")
                   and (c / TRAINER_STATE).is_file())
    old = steps[:-keep] if keep else steps
    for folder in old:
        shutil.rmtree(folder, ignore_errors=True)
    return old


def drop_training_state(run_dir: Path) -> int:
    """A finished run's folder without what only resuming it needs: its step checkpoints and the final
    checkpoint's trainer_state.pt (optimizer state: twice the weights in fp32). The weights, tokenizer and
    run_config.json stay, so later stages load it as before. Returns the bytes freed."""
    checkpoints = checkpoints_of(run_dir)
    freed = 0
    for path in [*checkpoints.glob("step_*"), checkpoints / FINAL / TRAINER_STATE]:
        if path.is_dir():
            freed += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file():
            freed += path.stat().st_size
            path.unlink()
    if (checkpoints / FINAL / MANIFEST).is_file():  # what is left still verifies
        write_manifest(checkpoints / FINAL)
    return freed


def saved_config(folder: Path) -> dict[str, Any]:
    if (folder / RUN_CONFIG).is_file():
        return json.loads((folder / RUN_CONFIG).read_text())
    return load_trainer_state(folder)["config"]  # checkpoints written before run_config.json


def resume_point(path: Path) -> Path:
    """The checkpoint `stage.resume_from` names: a checkpoint folder, or a run folder, whose newest whole
    checkpoint it means (as TRL's `resume_from_checkpoint=True`): what a run a SIGKILL or an OOM kill
    ended without a word resumes from. `<name>.partial` folders, cut off mid-write, are never picked; a
    checkpoint whose files no longer match its manifest (a truncated file, a full disk, a copy cut short)
    is passed over for the newest one that verifies, and the log says so. A named checkpoint that is
    damaged is refused, naming the file."""
    if (path / TRAINER_STATE).is_file() or not checkpoints_of(path).is_dir():
        damage = checkpoint_damage(path) if (path / TRAINER_STATE).is_file() else None
        if damage:
            run_folder = path.parent.parent if path.parent.name == CHECKPOINTS else None
            raise ConfigError("stage.resume_from", f"{path} is damaged: {damage}" + (
                f". stage.resume_from={run_folder} resumes from the run's newest checkpoint that is whole"
                if run_folder else ""))
        return path
    candidates = sorted((c for c in checkpoints_of(path).iterdir()
                         if not c.name.endswith(".partial") and (c / TRAINER_STATE).is_file()),
                        key=lambda c: (c.name == FINAL, c.name), reverse=True)  # final, step_000120, step_000012
    passed_over = []
    for candidate in candidates:
        damage = checkpoint_damage(candidate)
        if damage is None:
            for folder, why in passed_over:
                log.warning("checkpoint %s is damaged (%s): resuming from %s instead", folder.name, why, candidate.name)
            return candidate
        passed_over.append((candidate, damage))
    damaged = "; ".join(f"{folder.name}: {why}" for folder, why in passed_over)
    raise ConfigError("stage.resume_from", f"{path} is a run folder without a whole checkpoint in "
                      f"{path / 'checkpoints'}" + (f" (damaged: {damaged})" if damaged else
                                                  " (stage.save_every sets how often one is written)"))


def load_trainer_state(folder: Path) -> dict[str, Any]:
    """trainer_state.pt, read as tensors and plain values only (weights_only): unpickling anything else
    would run code a crafted checkpoint chose, so such a file is refused."""
    path = folder / TRAINER_STATE
    if not path.is_file():
        raise ConfigError("stage.resume_from", f"{folder} is not a checkpoint of this project (no {TRAINER_STATE})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError("stage.resume_from", f"{path} holds objects other than tensors and plain values, so it "
                          f"was not loaded (it could run code): not a checkpoint this project wrote ({first})") from None


def check_same_data(saved: dict | None, now: dict | None, data, folder: Path) -> bool:
    """Refuse to resume on data other than the checkpoint's (an edited file of the same path and row count
    would otherwise go ahead silently), naming the data and each split that changed. `saved` / `now`: split
    -> {rows, digest}. True where the data changed and data.allow_changed_on_resume lets the run go on."""
    if not saved or not now:
        return False
    changed = [f"the {split} split ({saved[split]['rows']} -> {now[split]['rows']} rows" +
               (", other contents" if saved[split]["rows"] == now[split]["rows"] else "") + ")"
               for split in now if split in saved and saved[split]["digest"] != now[split]["digest"]]
    if not changed:
        return False
    if data.get("allow_changed_on_resume"):
        log.warning("resuming on changed data (data.allow_changed_on_resume=true): %s", " and ".join(changed))
        return True
    key, source = ("data.path", data.path) if data.get("path") else ("data", f"data={data.name}")
    raise ConfigError(key, f"{source} is not the data {folder} was trained on: {' and '.join(changed)} changed. "
                      "Resume on the data it trained on, or set data.allow_changed_on_resume=true to go on "
                      "with this data")
