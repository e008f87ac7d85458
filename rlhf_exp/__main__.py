"""`python -m rlhf_exp [group=option ...] [key=value ...]`: the one entrypoint.

It picks the launcher once (rlhf_exp/launch/): a pipeline when the config has one (`experiment=tldr_pipeline`),
else one run of one stage; `-m` makes each job of a sweep one of those. `--help` lists the config groups a
person picks from (launch/cli_help.py), `--cfg job` prints the composed config, `--version` the versions.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from rlhf_exp.config import (CONF_DIR, check_yaml_of_choices, register_resolvers, register_schemas,
                             resolve_auto_hardware)
from rlhf_exp.errors import ReportedError
from rlhf_exp.stopping import RunStopped

register_resolvers()
log = logging.getLogger("rlhf_exp")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """One run or one pipeline; returns the sweep objective's final value (what a sweeper such as Optuna
    optimizes)."""
    from rlhf_exp.launch import jobs, sweep
    from rlhf_exp.launch.pipeline import run_pipeline
    from rlhf_exp.launch.run import redact_hydra_files, run
    from rlhf_exp.logs import quiet_library_notices
    from rlhf_exp.redact import redact_log_handlers

    context = jobs.LaunchContext.from_hydra()  # the one read of Hydra's global state, handed down
    redact_log_handlers()  # Hydra has just made the console and <job>.log handlers
    quiet_library_notices()
    redact_hydra_files(context)  # before anything can refuse the launch and leave them as they are
    in_sweep = context.in_sweep
    try:
        metrics = run_pipeline(cfg, context) if cfg.get("pipeline") else run(cfg, context=context)
    except ReportedError as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        if not in_sweep:
            sys.exit(2)
        sweep.job_failed(cfg, context, exc)  # a FAILED child, and the sweep goes on to its next job
        return None
    except RunStopped as stop:  # SIGTERM / SIGINT: checkpointed, closed KILLED, resume command printed
        sys.exit(stop.exit_code)
    except Exception as exc:
        if not in_sweep:
            raise
        log.exception("sweep job %s failed", context.job_number)
        sweep.job_failed(cfg, context, exc)
        return None
    return metrics.get(jobs.objective_of(cfg)[0])


def resumed_run_folder(args: list[str]) -> list[str]:
    """A resumed run goes on in its own folder (one run, one folder): Hydra's run folder, where it writes the log
    and .hydra/, is pointed at the run stage.resume_from continues. Not for sweeps, nor when the command sets one."""
    from rlhf_exp.checkpoint_layout import run_folder_of

    given = [a.split("=", 1)[1] for a in args if a.startswith("stage.resume_from=")]
    if not given or {"-m", "--multirun"} & set(args) or any(a.startswith("hydra.run.dir=") for a in args):
        return []
    folder = run_folder_of(Path(given[-1]).expanduser().resolve())
    return [f"hydra.run.dir='{folder}'"] if folder is not None and "'" not in str(folder) else []


def cli() -> None:
    from rlhf_exp.launch import cli_help, sweep
    from rlhf_exp.redact import protect_output

    args = sys.argv[1:]
    if "--version" in args:
        print(cli_help.version_text())
        return
    if "--help" in args or "-h" in args:
        print(cli_help.help_text())
        return
    protect_output()  # secrets never reach the console, from the first line written
    if not {"-sc", "--shell-completion"} & set(args):  # Hydra's tab completion reads its arguments as typed
        try:
            check_yaml_of_choices(args)
        except ReportedError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        # hardware=auto (the default) becomes the profile of this machine before Hydra composes.
        sys.argv = [sys.argv[0], *resolve_auto_hardware(args), *resumed_run_folder(args)]
    register_schemas()  # the typed schemas the group YAMLs name
    try:
        main()
    except SystemExit as stop:
        sweep.close_if_open("FAILED" if stop.code not in (130, 143) else "KILLED")
        raise
    except BaseException:
        sweep.close_if_open("KILLED")
        raise
    if sweep.LAST_SUMMARY and sweep.LAST_SUMMARY[0].failed:
        sys.exit(1)  # some jobs failed (the others ran; the parent run says which)


if __name__ == "__main__":
    cli()
