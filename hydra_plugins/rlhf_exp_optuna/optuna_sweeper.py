"""`hydra/sweeper=optuna` (conf/hydra/sweeper/optuna.yaml): Optuna's ask / tell loop over Hydra jobs. The
search itself, its resume and its search space are rlhf_exp/launch/optuna_sweep.py."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:  # conf/hydra/sweeper/optuna.yaml's keys, read in sweep()
        self.settings = settings

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)

    def sweep(self, arguments: list[str]) -> None:
        from omegaconf import OmegaConf

        from rlhf_exp.launch.jobs import objective_of
        from rlhf_exp.launch.optuna_sweep import open_search, search_space

        sweeper = self.config.hydra.sweeper
        params = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
        space, fixed = search_space([*params, *arguments])
        search = open_search(sweeper, objective_of(self.config)[1])
        job_number = [0]

        def launch(batch):
            returns = self.launcher.launch(batch, initial_job_idx=job_number[0])
            job_number[0] += len(returns)
            return returns

        search.run(space, fixed, launch)
        best = search.study.best_trial if any(t.value is not None for t in search.study.trials) else None
        if best is not None:
            OmegaConf.save(OmegaConf.create({"name": "optuna", "best_params": best.params, "best_value": best.value}),
                           f"{self.config.hydra.sweep.dir}/optimization_results.yaml")
