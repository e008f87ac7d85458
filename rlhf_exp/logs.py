"""What the console and a run's log show: this project's lines and every library's warnings, not the libraries'
notices (huggingface_hub's "Model weights successfully saved to ...partial!" at every checkpoint, and the like)."""

from __future__ import annotations

import logging
import os
import sys

# loggers whose INFO lines are kept: this project's, Hydra's and its launchers' (a sweep's job list)
OWN = ("rlhf_exp", "__main__", "hydra", "hydra_plugins")
# warnings that say nothing a person can act on, by logger and the start of the message
NOISE = (
    # bitsandbytes looks for an optional CPU kernel on the hub and falls back to its own: nothing is lost
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check"),
)


class LibraryNoticesFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return record.name.startswith(OWN)
        return not any(record.name == name and str(record.msg).startswith(start) for name, start in NOISE)


def quiet_library_notices() -> None:
    """On every handler of the root logger (Hydra's console and `<job>.log`); and MLflow, which prints through a
    handler of its own ("Creating initial MLflow database tables...", "Running the predict function..."), at
    warnings unless MLFLOW_LOGGING_LEVEL says otherwise (it reads that when imported; the processes a run
    starts inherit it)."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if "mlflow" in sys.modules:  # imported already: its loggers are set up
        logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())
    on_root_handlers(LibraryNoticesFilter)


def on_root_handlers(filter_type: type[logging.Filter]) -> None:
    """A `filter_type` on every handler of the root logger that has none yet (Hydra's console and `<job>.log`)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, filter_type) for f in handler.filters):
            handler.addFilter(filter_type())
