"""`python -m rlhf_exp [group=option ...] [key=value ...]`: the one entrypoint.

`--help` lists the config groups, `--cfg job` prints the composed config, `-m` sweeps.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from rlhf_exp.config import CONF_DIR, register_resolvers, register_schemas, resolve_auto_hardware
from rlhf_exp.errors import ReportedError
from rlhf_exp.stopping import RunStopped

register_resolvers()
log = logging.getLogger("rlhf_exp")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from rlhf_exp.app import run

    try:
        metrics = run(cfg)
    except ReportedError as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except RunStopped as stop:  # SIGTERM / SIGINT: checkpointed, closed KILLED, resume command printed
        sys.exit(stop.exit_code)
    # A sweeper (Optuna) minimises the value returned here.
    return metrics.get("eval/loss")


def cli() -> None:
    # hardware=auto (the default) becomes the profile of this machine before Hydra composes.
    sys.argv = [sys.argv[0], *resolve_auto_hardware(sys.argv[1:])]
    register_schemas()  # the typed schemas the group YAMLs name
    main()


if __name__ == "__main__":
    cli()
