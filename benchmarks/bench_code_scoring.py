"""Scoring speed: our sandboxed scorer vs evalplus's own evaluator on a full HumanEval+ or MBPP+ set.

Both score the same programs (the canonical solutions, or `--solutions mutated`), each in a fresh interpreter, with
the same number of checks at once (`--parallel`, default evalplus's own: half the cores). Each repeat runs, in an
order that alternates between repeats:
- `cold`: empty ground-truth caches, so the expected outputs are computed (evalplus: once for the set; ours: once
  per problem) and the time includes that;
- `warm`: the caches the cold runs filled, as in every later evaluation.
The figure is evalplus's seconds / ours (above 1: ours is faster), measured in one run. Timed: run it alone on the
machine.

    DIFFMAS_DATA_DIR=../shared/data python benchmarks/bench_code_scoring.py --dataset humaneval
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from _code_scoring import RESULTS, canonical_programs, mutated_programs, run_scorer, write_result

SCORERS = ("evalplus", "ours")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("humaneval", "mbpp"), required=True)
    parser.add_argument("--solutions", choices=("canonical", "mutated"), default="canonical")
    parser.add_argument("--parallel", type=int, default=None, help="checks at once (default: half the cores)")
    parser.add_argument("--repeats", type=int, default=1, help="cold + warm rounds, order alternating")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    from diffmas_eval.benchmarks.code_exec import default_parallel

    parallel = args.parallel or default_parallel()
    programs = (canonical_programs if args.solutions == "canonical" else mutated_programs)(args.dataset)
    seconds: dict[str, list[float]] = {f"{scorer}_{state}": [] for state in ("cold", "warm") for scorer in SCORERS}
    passed: dict[str, int] = {}
    sandbox = None
    for repeat in range(args.repeats):
        order = SCORERS if repeat % 2 == 0 else SCORERS[::-1]
        with tempfile.TemporaryDirectory(prefix="bench-code-") as folder:
            caches = {scorer: Path(folder) / scorer for scorer in SCORERS}
            for state in ("cold", "warm"):
                for scorer in order:
                    run = run_scorer(scorer, args.dataset, programs, parallel, caches[scorer])
                    seconds[f"{scorer}_{state}"].append(run.seconds)
                    passed[scorer] = run.passed_plus
                    sandbox = run.sandbox or sandbox
                    print(f"repeat {repeat} {state:4} {scorer:8} {run.seconds:7.1f} s  plus-pass {run.passed_plus}")
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    ratios = {state: medians[f"evalplus_{state}"] / medians[f"ours_{state}"] for state in ("cold", "warm")}
    rows = [
        "| cache | evalplus's evaluator (s) | ours (s) | evalplus / ours |",
        "|---|---|---|---|",
        *(
            f"| {state} | {medians[f'evalplus_{state}']:.1f} | {medians[f'ours_{state}']:.1f} | {ratios[state]:.2f}x |"
            for state in ("cold", "warm")
        ),
        "",
        f"{len(programs)} {args.solutions} programs of {args.dataset}, {parallel} check(s) at once, "
        f"{args.repeats} repeat(s) (medians). Problems passing base + plus: evalplus {passed['evalplus']}, "
        f"ours {passed['ours']}. Our sandbox: {sandbox['sandbox'] if sandbox else 'unknown'}.",
    ]
    payload = {
        "dataset": args.dataset,
        "solutions": args.solutions,
        "programs": len(programs),
        "parallel": parallel,
        "repeats": args.repeats,
        "seconds": seconds,
        "median_seconds": medians,
        "evalplus_over_ours": ratios,
        "passed_plus": passed,
        "sandbox": sandbox,
    }
    write_result(args.out, f"code_scoring_{args.dataset}_{args.solutions}_p{parallel}", payload, rows)


if __name__ == "__main__":
    main()
