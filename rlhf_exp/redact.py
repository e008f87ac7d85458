"""Secrets kept out of everything a run writes: MLflow params, the config artifact and `config.yaml`,
`trainer_state.pt` and Hydra's `.hydra/` files.

A value is hidden when its key names a secret (`hub_token`, `api_key`, `password`, ...) or when it
looks like one wherever it sits (a Hugging Face / OpenAI / GitHub / AWS / Slack token, a JWT, the
password of a `scheme://user:password@host` URI, `key=value` overrides). The run itself keeps the
real values: only what is written is redacted.
"""

from __future__ import annotations

import re
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


def is_secret_key(name: str) -> bool:
    """`hub_token`, `HF_TOKEN`, `model.api-key`: the last part of the key, split at _ and -."""
    parts = [p for p in re.split(r"[_\-]", str(name).rsplit(".", 1)[-1].lower()) if p]
    return any(p in _SECRET_WORDS for p in parts) or any(pair in _SECRET_PAIRS for pair in zip(parts, parts[1:]))


def redact_text(text: str) -> str:
    """Token-like substrings and URI passwords hidden; `key=value` with a secret key keeps only the key."""
    override = _OVERRIDE.match(text)
    if override and is_secret_key(override.group(1)):
        return f"{override.group(1)}={REDACTED}"
    return _URI_PASSWORD.sub(rf"\g<1>{REDACTED}\g<3>", _TOKEN_VALUE.sub(REDACTED, text))


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
