"""`python -m rlhf_exp.report <parent run id | sweep folder>`: the command users type for a sweep's report,
which lives in rlhf_exp/launch/report.py."""

from rlhf_exp.launch.report import main

if __name__ == "__main__":
    raise SystemExit(main())
