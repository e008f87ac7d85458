"""The one place that calls `hydra.utils.instantiate`."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from rlhf_exp.errors import ConfigError, UserInputError


def build(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """Instantiate `node` (which has a `_target_`); a bad target is reported by its config key."""
    if node is None or "_target_" not in node:
        raise ConfigError(key, "needs a `_target_` naming a class or function")
    try:
        return instantiate(node, _recursive_=False, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, UserInputError):
            raise cause from None
        raise ConfigError(f"{key}._target_", f"could not build {node._target_!r}: {exc}") from exc
