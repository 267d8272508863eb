"""`diffmas-report RESULTS_DIR [RESULTS_DIR ...] --out DIR`: write the report of lm-eval result directories."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffmas_eval.reporting.baselines import baselines_dir
from diffmas_eval.reporting.report import build_report, write_report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffmas-report",
        description="Leaderboard, cost, decoding stability, paired comparisons and paper baselines from lm-eval "
        "results_*.json (runs identified from each file's own config).",
    )
    parser.add_argument(
        "results_dirs",
        nargs="+",
        type=Path,
        metavar="RESULTS_DIR",
        help="directories searched recursively for results_*.json",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory (created if missing)")
    parser.add_argument(
        "--all-runs",
        action="store_true",
        help="keep every rerun of a configuration as its own row (default: newest wins)",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--baselines",
        type=Path,
        default=None,
        help="directory of published-number CSVs (default: the repository's baselines/)",
    )
    group.add_argument("--no-baselines", action="store_true", help="leave the paper numbers out")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the report CLI; returns the process exit code (0 written, 2 bad arguments or no usable results)."""
    parser = _parser()
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.results_dirs if not d.is_dir()]
    if missing:
        parser.error(f"not a directory: {', '.join(missing)}; pass directories that hold lm-eval results_*.json")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; name a directory to write the report into")
    baselines = None
    if not args.no_baselines:
        baselines = args.baselines or baselines_dir()
        if not baselines.is_dir():
            parser.error(f"--baselines {baselines} is not a directory; pass the baselines/ folder or --no-baselines")
    report = build_report(args.results_dirs, all_runs=args.all_runs, baselines=baselines)
    for message in report.warnings:
        print(f"warning: {message}", file=sys.stderr)
    if report.tables["leaderboard"].empty:
        print("error: no usable results_*.json found; nothing to report (see the warnings above)", file=sys.stderr)
        return 2
    files = write_report(report, args.out)
    print(f"wrote {len(files)} files to {args.out} (open {args.out / 'report.html'})")
    return 0
