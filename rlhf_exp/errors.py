"""Errors reported as one clear line instead of a traceback: wrong input, or a machine that ran out of room."""

import errno
import re


class ReportedError(Exception):
    """An error whose message says all the user needs; the entrypoint prints it and exits with status 2."""


class UserInputError(ReportedError, ValueError):
    """Bad input from the user: a config value, a data file, a field. The message names it."""


class ConfigError(UserInputError):
    """A config key holds a value that cannot work. The message names the key."""

    def __init__(self, key: str, problem: str):
        self.key = key
        super().__init__(f"config key `{key}`: {problem}")


class DataError(UserInputError):
    """A data file is missing or malformed. The message names the file and, where known, the line."""

    def __init__(self, path, problem: str, line: int | None = None, reason: str | None = None):
        self.path, self.line = str(path), line
        # a short category for the counts of data.on_bad_row=skip ("invalid JSON", "missing field", ...)
        self.reason = reason or re.split(r" \(|:|;", problem, maxsplit=1)[0].strip()[:48]
        where = f"{path}, line {line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}")


class NonFiniteError(ReportedError, ArithmeticError):
    """Training produced a NaN or infinite loss or gradient norm (stage.on_nonfinite=stop). The step that
    produced it was not applied and nothing was written after it."""

    def __init__(self, metric: str, value: float, step: int | None = None, last_checkpoint=None,
                 applied: bool = False):
        self.metric, self.value, self.step, self.last_checkpoint = metric, value, step, last_checkpoint
        self.applied = applied  # DeepSpeed reports its norm only after its step
        kept = f"the last checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
        at = f"step {step}: " if step is not None else ""
        update = "was applied, nothing was written after it," if applied else "was not applied"
        super().__init__(f"{at}{metric} is {value} (stage.on_nonfinite=stop): this step's update {update} "
                         f"and {kept}; lower stage.lr, or set stage.on_nonfinite=skip_step to skip such steps")

    def at_step(self, step: int, last_checkpoint) -> "NonFiniteError":
        return NonFiniteError(self.metric, self.value, step, last_checkpoint, self.applied)


class DiskFullError(ReportedError, OSError):
    """The disk filled while writing `path`; what was written before is intact and the partial write is removed."""

    def __init__(self, path, free_bytes: int):
        self.path = str(path)
        super().__init__(errno.ENOSPC, f"no space left on the device while writing {path} "
                         f"({free_bytes / 2**20:.0f} MiB free after removing the partial write); earlier "
                         "checkpoints are intact: free some space and resume with stage.resume_from=<checkpoint>")

    def __str__(self) -> str:
        return self.strerror


# what writers that drop the errno say for a short write: safetensors, and torch.save's zip writer
# ("[enforce fail at inline_container.cc] . unexpected pos 704 vs 598", "file write failed")
SHORT_WRITE = ("No space left on device", "unexpected pos ", "file write failed")


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC as an OSError, or as the text of an error a writer (safetensors, torch.save) raised in its place."""
    return (isinstance(error, OSError) and error.errno == errno.ENOSPC) or any(s in str(error) for s in SHORT_WRITE)


# what the allocators say when memory runs out (torch's CPU allocator raises a RuntimeError, CUDA its own type)
OUT_OF_MEMORY = ("DefaultCPUAllocator: can't allocate memory", "CUDA out of memory", "Cannot allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    return (isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
            or any(text in str(error) for text in OUT_OF_MEMORY))


class OutOfMemory(ReportedError, MemoryError):
    """An allocation failed: one line with what was asked for and what the memory plan expected."""

    def __init__(self, device: str, error: BaseException, plan: str):
        first = next((line.strip() for line in str(error).splitlines() if "allocate" in line or "memory" in line),
                     type(error).__name__)
        super().__init__(f"out of memory on {device} ({first[:300]}); {plan}")
