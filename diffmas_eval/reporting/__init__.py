"""Reporting: leaderboard, cost, stability, paired comparisons and paper baselines from lm-eval result files.

Entry points: `diffmas-report` / `python -m diffmas_eval.reporting` (see `cli.py`) and `build_report` +
`write_report` for use from Python.
"""

from diffmas_eval.reporting.report import Report, build_report, write_report

__all__ = ["Report", "build_report", "write_report"]
