"""Secrets kept out of everything a run writes: MLflow params, the config artifact and `config.yaml`,
`trainer_state.pt`, Hydra's `.hydra/` files, the run records (`tracking.json`, `sweep.json`), and, from the
first line the process writes, the console and the log files (`protect_output`, `redact_log_handlers`).

A value is hidden when its key names a secret (`hub_token`, `api_key`, `password`, ...) or when it
looks like one wherever it sits (a Hugging Face / OpenAI / GitHub / AWS / Slack token, a JWT, the
password of a `scheme://user:password@host` URI, `key=value` overrides). The run itself keeps the
real values: only what is written is redacted.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

REDACTED = "***redacted***"

_SECRET_WORDS = {"token", "secret", "password", "passwd", "pwd", "apikey", "credential", "credentials", "auth"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"), ("client", "secret")}
_TOKEN_VALUE = re.compile(
    r"(?<![A-Za-z0-9])(hf_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{30,}"
    r"|github_pat_[A-Za-z0-9_]{30,}|AKIA[0-9A-Z]{16}|xox[abpr]-[A-Za-z0-9-]{10,}"
    r"|eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,})")
_URI_PASSWORD = re.compile(r"(://[^:/@\s]+:)([^@\s]+)(@)")
_OVERRIDE = re.compile(r"^([+~]{0,2}[\w.\-/@]+)=(.*)$", re.S)
# inside free text (a log line, an error): `hub_token=value`, `hub_token: value`, `"api_key": "value"`
_ASSIGNMENT = re.compile(r"(?P<key>[+~]{0,2}[A-Za-z_][\w.\-]*)(?P<q>['\"]?)(?P<sep>=|:[ \t]*)(?P<vq>['\"]?)"
                         r"(?P<value>[^\s'\",;)\]}]+)")


# `<word>_token` that names a kind of token or a figure per token, never a credential (`kl_k1_token`, `pad_token_id`)
_TOKEN_KINDS = {"kl", "k1", "per", "pad", "eos", "bos", "end", "unk", "sep", "cls", "mask", "special", "stop", "max", "min",
                "new", "num", "first", "last", "next"}


def is_secret_key(name: str) -> bool:
    """`hub_token`, `HF_TOKEN`, `model.api-key`: the last part of the key (after its last `.` or `/`), split at
    _ and -; `eval/sft/kl_k1_token` and `pad_token_id` are not secrets."""
    last = re.split(r"[./]", str(name))[-1].lower()
    parts = [p for p in re.split(r"[_\-]", last) if p]
    words = [p for i, p in enumerate(parts) if not (p == "token" and i > 0 and parts[i - 1] in _TOKEN_KINDS)]
    return any(p in _SECRET_WORDS for p in words) or any(pair in _SECRET_PAIRS for pair in zip(parts, parts[1:]))


def redact_text(text: str) -> str:
    """Token-like substrings and URI passwords hidden; `key=value` with a secret key keeps only the key."""
    override = _OVERRIDE.match(text)
    if override and is_secret_key(override.group(1)):
        return f"{override.group(1)}={REDACTED}"
    text = _URI_PASSWORD.sub(rf"\g<1>{REDACTED}\g<3>", _TOKEN_VALUE.sub(REDACTED, text))
    return _ASSIGNMENT.sub(_hide_secret_assignment, text)


def _hide_secret_assignment(match: re.Match) -> str:
    if not is_secret_key(match["key"]) or match["value"] == REDACTED:
        return match.group(0)
    return f"{match['key']}{match['q']}{match['sep']}{match['vq']}{REDACTED}"


def redact(value: Any, key: str = "") -> Any:
    """A copy of plain containers (dicts, lists, strings) with secrets hidden."""
    if isinstance(value, dict):
        return {k: (REDACTED if is_secret_key(str(k)) and v is not None and not isinstance(v, (dict, list))
                    else redact(v, str(k))) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, key) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_yaml_files(folder: Path) -> None:
    """Rewrite the YAML files Hydra wrote (config, overrides, hydra, multirun) with secrets hidden."""
    for path in sorted(Path(folder).glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        hidden = redact(data)
        if hidden != data:
            path.write_text(yaml.safe_dump(hidden, sort_keys=False))


class RedactingStream:
    """sys.stdout / sys.stderr with secrets hidden in what is written (prints, progress bars, warnings,
    tracebacks, the log's console handler); everything else is the stream's own."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact_text(text) if isinstance(text, str) else text)
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def protect_output() -> None:
    """From here on, secrets never reach the console through sys.stdout / sys.stderr."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))


class RedactingFilter(logging.Filter):
    """A log record with its message (and traceback) redacted, for every handler it reaches."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        hidden = redact_text(message)
        if hidden != message:
            record.msg, record.args = hidden, ()
        if record.exc_info:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def redact_log_handlers() -> None:
    """Every handler of the root logger (Hydra's console and `<job>.log` file) hides secrets."""
    from rlhf_exp.logs import on_root_handlers

    on_root_handlers(RedactingFilter)


def uri_with_password(recorded: str, env_name: str = "MLFLOW_TRACKING_URI") -> str:
    """A tracking URI as a run record keeps it (its password redacted), with the password put back from the
    environment's URI of the same user and host; unchanged when it had none."""
    if REDACTED not in recorded:
        return recorded
    current = os.environ.get(env_name, "")
    if current and redact_text(current) == recorded:
        return current
    from rlhf_exp.errors import UserInputError

    raise UserInputError(f"{recorded} needs its password, which no run record keeps: set {env_name} to that URI "
                         "with its password")
