"""`sweep=optuna`: a Hydra sweeper on Optuna's ask / tell API (the plugin class is
hydra_plugins/rlhf_exp_optuna/optuna_sweeper.py; the search is here), resumable.

`hydra.sweeper.n_trials` is the study's total, so a search killed after 2 of 4 trials and started again with
the same command runs the 2 that are left: with a persistent study (`storage` and `study_name`), the trials
it has finished (complete, pruned or failed) are subtracted, trials a killed search left RUNNING (never told,
they would sit in the study forever) are told failed, and a seeded sampler's seed is moved on by the trials
done (else it would draw the same points again). A `direction` of null becomes the sweep objective's
(maximize held-out accuracy, minimize a loss; rlhf_exp/launch/sweep.py).

The search space is Hydra's sweep syntax, from `hydra.sweeper.params` and the command line:
`interval(a, b)` (floats; `int(interval(a, b))` for ints), `tag(log, interval(a, b))`, `choice(...)`,
`range(...)`; any other override is passed to every trial as it is.

Run one search per study at a time: a RUNNING trial of a live search elsewhere would be failed too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def is_optuna(config: DictConfig) -> bool:
    return str(OmegaConf.select(config, "hydra.sweeper._target_")).endswith("OptunaSweeper")


def finished_trials(storage: str | None, study_name: str | None) -> int:
    """Trials of the study that ended on their own (0 without a persistent study or before it exists)."""
    import optuna

    if not storage or not study_name:
        return 0
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return 0
    return sum(trial.state.is_finished() for trial in study.get_trials(deepcopy=False))


def study_record(config: DictConfig) -> dict[str, str]:
    """What the sweep's parent run records about the study (read before the search starts; changes nothing)."""
    sweeper = config.hydra.sweeper
    storage, name = sweeper.get("storage"), sweeper.get("study_name")
    return {"optuna.study": str(name), "optuna.storage": str(storage),
            "optuna.trials_before": str(finished_trials(storage, name)), "optuna.n_trials": str(sweeper.n_trials)}


def search_space(overrides: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """({key: Optuna distribution} of the sweep overrides, [the other overrides, as they are])."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    distributions: dict[str, Any] = {}
    fixed: list[str] = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.get_key_element()
        if not override.is_sweep_override():
            fixed.append(f"{key}={override.get_value_element_as_str()}")
            continue
        sweep = override.value()
        if override.is_interval_sweep():
            log_scale = "log" in sweep.tags
            if isinstance(sweep.start, int) and isinstance(sweep.end, int):
                distributions[key] = IntDistribution(sweep.start, sweep.end, log=log_scale)
            else:
                distributions[key] = FloatDistribution(float(sweep.start), float(sweep.end), log=log_scale)
            continue
        values = list(override.sweep_iterator(transformer=Transformer.encode))
        if override.is_range_sweep() and not sweep.shuffle and all(isinstance(v, int) for v in values):
            distributions[key] = IntDistribution(values[0], values[-1], step=int(sweep.step))
        else:  # choice(...), a shuffled or float range
            distributions[key] = CategoricalDistribution(values)
    return distributions, fixed


@dataclass
class Search:
    """One search: the study, the trials left to run, and how a batch of trials is launched."""

    study: Any
    n_trials: int
    n_jobs: int
    max_failure_rate: float

    def run(self, space: dict[str, Any], fixed: list[str],
            launch: Callable[[list[tuple[str, ...]]], Sequence[Any]]) -> None:
        """Ask n_jobs trials at a time, launch them as one batch of Hydra jobs, tell each its job's return value
        (a job that failed, or returned no number, is a FAILED trial)."""
        from optuna.trial import TrialState

        left = self.n_trials
        while left > 0:
            trials = [self.study.ask(space) for _ in range(min(self.n_jobs, left))]
            returns = launch([(*fixed, *(f"{key}={value}" for key, value in trial.params.items()))
                              for trial in trials])
            failed = 0
            for trial, job in zip(trials, returns):
                try:
                    value = float(job.return_value)  # re-raises the job's exception
                except Exception as error:  # a failed job: a failed trial, and the search goes on
                    log.warning("optuna: trial %d failed: %s", trial.number, error)
                    self.study.tell(trial, state=TrialState.FAIL)
                    failed += 1
                    continue
                self.study.tell(trial, value)
            if failed / len(trials) > self.max_failure_rate:
                raise RuntimeError(f"optuna: {failed} of {len(trials)} trials failed, more than "
                                   f"hydra.sweeper.max_failure_rate={self.max_failure_rate}")
            left -= len(trials)


def open_search(sweeper: DictConfig, objective_direction: str) -> Search:
    """The study (created, or loaded and continued: see the module docstring) and the trials left to run."""
    import optuna
    from hydra.utils import instantiate
    from optuna.trial import TrialState

    storage, name = sweeper.get("storage"), sweeper.get("study_name")
    done = finished_trials(storage, name)
    sampler_cfg = OmegaConf.to_container(sweeper.sampler, resolve=True) if sweeper.get("sampler") else None
    if done and sampler_cfg and sampler_cfg.get("seed") is not None:
        # a seeded sampler started again draws its first points again: the continued search would
        # repeat the trials it already ran (its random start-up trials most plainly)
        sampler_cfg["seed"] = int(sampler_cfg["seed"]) + done
    direction = sweeper.get("direction") or ("maximize" if objective_direction == "max" else "minimize")
    study = optuna.create_study(study_name=name, storage=storage, direction=direction, load_if_exists=True,
                                sampler=instantiate(sampler_cfg) if sampler_cfg else None)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
        log.warning("optuna: trial %d of study %r was left running by a search that stopped: told failed",
                    trial.number, study.study_name)
    total = int(sweeper.n_trials)
    left = max(0, total - done)
    if done:
        log.info("optuna: study %r has %d of its %d trials; running %d more", study.study_name, done, total, left)
    return Search(study, left, max(1, int(sweeper.n_jobs)), float(sweeper.max_failure_rate))
