"""Where a run keeps its checkpoints and what a checkpoint folder holds, by name: one place for the layout
that saving (checkpoint.py, a stage's `extra_files`), loading (models/), the planner, export and lineage all
read; and whether a model is named by a local folder or a hub id.

    <run_dir>/checkpoints/       step_000120/ (stage.save_every, a stop signal), final/ (the last step's),
                                 best/ (stage.keep_best: the best evaluation's weights, no training state)
    <checkpoint>/                a Hugging Face folder: config.json, model.safetensors, the tokenizer
      run_config.json            the run's config, secrets redacted (read before anything loads on resume)
      trainer_state.pt           what resuming needs: optimizer, scheduler, step, generators (absent: weights only)
      adapter_model.safetensors  with LoRA: the adapters, which a resume loads onto the base
      reward_head.safetensors    with LoRA, a reward model's head and offset beside its adapters
      merged/                    with LoRA, the final checkpoint: adapters merged into float base weights
      best.json                  in best/: its step, metric, direction and value
      manifest.json              written last: every file's size and sha256 (a resume trusts only what matches)
"""

from __future__ import annotations

from pathlib import Path

TRAINER_STATE = "trainer_state.pt"
RUN_CONFIG = "run_config.json"
MANIFEST = "manifest.json"      # {"files": {relative path: {"size", "sha256"}}}
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEAD_FILE = "reward_head.safetensors"  # also beside a backbone in older checkpoints
MERGED = "merged"
CHECKPOINTS = "checkpoints"
FINAL = "final"
BEST = "best"
BEST_RECORD = "best.json"
WHICH = {"last": FINAL, "best": BEST}  # the checkpoint each `--which` / `run:<role>@best` choice names


def checkpoints_of(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_checkpoint(run_dir: str | Path, step: int) -> Path:
    return checkpoints_of(run_dir) / f"step_{step:06d}"


def weights_folder(folder: str | Path) -> Path:
    """Where a checkpoint's full weights are: `merged/` for a LoRA checkpoint, else the folder."""
    folder = Path(folder)
    return folder / MERGED if (folder / MERGED).is_dir() else folder


def looks_local(path: str) -> bool:
    """A model named by a filesystem path rather than a hub id: it exists, or is absolute, or starts with . or ~."""
    return Path(path).exists() or path.startswith(("/", ".", "~"))


def run_folder_of(path: str | Path) -> Path | None:
    """The run folder a `stage.resume_from` value belongs to: the folder itself (it holds checkpoints/), or the one
    a checkpoint sits in (<run>/checkpoints/step_000012); None for a folder elsewhere. A resumed run writes there:
    one run, one folder."""
    path = Path(path)
    if checkpoints_of(path).is_dir():
        return path
    if path.parent.name == CHECKPOINTS:
        return path.parent.parent
    return None
