"""The launchers, above the library: `run` (one run of one stage, tracked), `pipeline` (stages in order as
children of one parent run), `sweep` and `optuna_sweep` (Hydra multiruns as a parent run and its children),
`report` (a sweep's comparison), `lineage` (`run:` references between runs) and `jobs` (what a run knows of
the job it belongs to). `python -m rlhf_exp` (rlhf_exp/__main__.py) picks one; nothing below imports them."""
