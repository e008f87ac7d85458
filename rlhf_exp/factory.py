"""The one place that calls `hydra.utils.instantiate`, and what a `_target_` may name.

A `_target_` runs whatever it names, and configs come from command lines, sweep files and shared
experiment YAMLs: `reward.fn._target_=torch.load` with a pickle would run its code. So targets are
limited to this package plus the module prefixes listed in `allowed_targets` on purpose
(`allowed_targets=[mypackage.rewards]`), checked before anything loads (`check_targets`) and again here.
"""

from __future__ import annotations

from typing import Any, Sequence

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from rlhf_exp.errors import ConfigError, UserInputError


BUILT_IN = "rlhf_exp"


def check_target(target: Any, key: str, allowed: Sequence[str]) -> None:
    prefixes = [BUILT_IN, *allowed]
    name = str(target)
    if not any(name == prefix or name.startswith(f"{prefix}.") for prefix in prefixes):
        raise ConfigError(key, f"{name!r} is outside the modules a config may run ({', '.join(prefixes)}); "
                          f"to run your own code, add its module: allowed_targets=[{name.rsplit('.', 1)[0]}]")


def check_targets(cfg: Any, allowed: Sequence[str], prefix: str = "") -> None:
    """Every `_target_` anywhere in `cfg` (nested dicts and lists), named by its key when refused."""
    if isinstance(cfg, (DictConfig, ListConfig)):  # (a ??? left for the command line is no target)
        cfg = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    if isinstance(cfg, dict):
        for name, value in cfg.items():
            key = f"{prefix}.{name}" if prefix else str(name)
            if name == "_target_":
                check_target(value, key, allowed)
            else:
                check_targets(value, allowed, key)
    elif isinstance(cfg, list):
        for i, value in enumerate(cfg):
            check_targets(value, allowed, f"{prefix}[{i}]")


def build(node: DictConfig, key: str, allowed: Sequence[str], **kwargs: Any) -> Any:
    """Instantiate `node` (which has a `_target_` within `allowed_targets`); a bad target is reported by its key."""
    if node is None or "_target_" not in node:
        raise ConfigError(key, "needs a `_target_` naming a class or function")
    check_targets(node, allowed, key)
    try:
        return instantiate(node, _recursive_=False, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, UserInputError):
            raise cause from None
        raise ConfigError(f"{key}._target_", f"could not build {node._target_!r}: {exc}") from exc
