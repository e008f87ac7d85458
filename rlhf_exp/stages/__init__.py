"""One file per stage: sft.py rm.py dpo.py kto.py grpo.py ppo.py eval.py. Each holds its typed config, what runs it
and `STAGE`, the StageSpec through which everything else learns about it (spec.py); its values are in
conf/stage/<name>.yaml. Shared: base.py (the training loop and the protocol a stage supplies), toolbox.py
(models, data, sampling and scoring, for the loop and for eval), online.py (what GRPO and PPO share).
"""

from __future__ import annotations

import importlib

from rlhf_exp.errors import ConfigError
from rlhf_exp.stages.spec import StageSpec


def stage_spec(name: str) -> StageSpec:
    """The StageSpec of stage `name`, from rlhf_exp/stages/<name>.py."""
    module_name = f"{__name__}.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        raise ConfigError("stage", f"no stage {name!r}: a stage is rlhf_exp/stages/{name}.py (declaring STAGE) "
                          f"and conf/stage/{name}.yaml") from None
    spec = getattr(module, "STAGE", None)
    if not isinstance(spec, StageSpec) or spec.name != name:
        raise ConfigError("stage", f"rlhf_exp/stages/{name}.py must declare STAGE = StageSpec(name={name!r}, ...)")
    return spec
