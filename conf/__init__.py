"""The config groups. In a wheel this folder is the package `rlhf_exp.conf` (pyproject.toml's package-dir),
so `rlhf_exp/config.py` finds it beside the installed code."""
