"""hydra-optuna-sweeper (`hydra/sweeper=optuna`, conf/sweep/optuna.yaml), made resumable.

The plugin runs `n_trials` *more* trials each time it starts, so a search killed after 2 of 4 trials and
started again would run 4 more. Before the sweeper starts, `SweepCallback` calls `prepare` on the
multirun's config: with a persistent study (`storage` and `study_name`), `n_trials` becomes the study's
total: the trials it has finished (complete, pruned or failed) are subtracted, and trials a killed search
left RUNNING (never told, they would sit in the study forever) are marked failed; a seeded sampler's seed
is moved on by the trials done (else it would draw the same points again). A `direction` of null
becomes the sweep objective's (maximize held-out accuracy, minimize a loss; rlhf_exp/launch/sweep.py).

Run one search per study at a time: a RUNNING trial of a live search elsewhere would be failed too.
"""

from __future__ import annotations

import logging
import warnings

from omegaconf import DictConfig, OmegaConf, read_write

log = logging.getLogger(__name__)


def is_optuna(config: DictConfig) -> bool:
    return str(OmegaConf.select(config, "hydra.sweeper._target_")).endswith("OptunaSweeper")


def continue_study(storage: str, study_name: str) -> int:
    """How many trials the study has finished (0 if it does not exist yet); RUNNING ones are failed."""
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return 0
    finished = 0
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.RUNNING:
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            log.warning("optuna: trial %d of study %r was left running by a search that stopped: marked failed",
                        trial.number, study_name)
        elif trial.state.is_finished():
            finished += 1
    return finished


def prepare(config: DictConfig, objective_direction: str) -> dict[str, str]:
    """Set the Optuna sweeper's direction and remaining trials in `config` (see the module docstring);
    returns what the parent run records about the study."""
    # the plugin builds Optuna 2's distributions, deprecated (still there) since Optuna 3
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"optuna\.distributions")
    sweeper = config.hydra.sweeper
    with read_write(sweeper):
        if sweeper.get("direction") is None:
            sweeper.direction = "maximize" if objective_direction == "max" else "minimize"
        total, storage, name = int(sweeper.n_trials), sweeper.get("storage"), sweeper.get("study_name")
        done = continue_study(str(storage), str(name)) if storage and name else 0
        sweeper.n_trials = max(0, total - done)
        if done and sweeper.get("sampler") is not None and sweeper.sampler.get("seed") is not None:
            # a seeded sampler started again draws its first points again: the continued search would
            # repeat the trials it already ran (its random start-up trials most plainly)
            sweeper.sampler.seed = int(sweeper.sampler.seed) + done
    if done:
        log.info("optuna: study %r has %d of its %d trials; running %d more", name, done, total, sweeper.n_trials)
    return {"optuna.study": str(name), "optuna.storage": str(storage), "optuna.trials_before": str(done),
            "optuna.n_trials": str(total)}
