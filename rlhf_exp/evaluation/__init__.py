"""How runs and policies are judged, apart from the stages that run them:
statistics.py (intervals, calibration, win rates, length control), text.py (ROUGE-L, distinct-n),
tables.py (the one markdown table writer), figures.py (curves, reliability; matplotlib on first use)."""
