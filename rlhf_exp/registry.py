"""Variant axes as registries (verl's `register_policy_loss` / `register_adv_est`): a name maps to the
function that implements it, a config key's allowed values are the registry's names (the schema reads
them with `one_of`), and a new variant is one decorated function beside its siblings:

    @DPO_LOSSES.register("hinge")
    def hinge(chosen_logratios, rejected_logratios, *, beta, **_): ...
"""

from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(dict):
    """name -> function; `what` names the axis in the error for an unknown name."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, name: str) -> Callable[[F], F]:
        def add(function: F) -> F:
            if name in self:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self[name] = function
            return function

        return add

    def lookup(self, name: str) -> Callable:
        if name not in self:
            raise ValueError(f"unknown {self.what} {name!r}; use one of {', '.join(self)}")
        return self[name]
