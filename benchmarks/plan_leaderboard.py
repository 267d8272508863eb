"""Plan a leaderboard from measurements: documents per task for a detectable paired difference, and CPU hours.

Power: two methods scored on the same n documents differ by delta in accuracy; McNemar's test (two-sided, alpha)
detects it with probability `power` when

    n >= (z_{1-alpha/2} * sqrt(p_d) + z_{power} * sqrt(p_d - delta^2))^2 / delta^2,

where p_d is the fraction of documents on which the two methods disagree (Connor 1987). p_d is unknown before the
runs; the table gives n for several values (methods of one backbone typically disagree on 10-30% of documents).

Cost: seconds per document per method and request type come from `bench_throughput.py` result files (generation on
GSM8K, letter scoring on ARC-Easy, both at the leaderboard's batch size and dtype); each task is costed with the
measurement of its kind, scaled by its prompt length relative to the measured one when `--scale-prompts` is given.

    python benchmarks/plan_leaderboard.py results/perf/throughput_qwen2.5-coder-0.5b-instruct_bfloat16_b8.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from scipy.stats import norm

# The leaderboard's tasks: (name, request kind, test documents available).
TASKS = [
    ("mas_gsm8k", "generate", 1319),
    ("mas_math500", "generate", 500),
    ("mas_arc_challenge_mc", "score", 1172),
    ("mas_arc_challenge", "generate", 1172),
    ("mas_openbookqa_mc", "score", 500),
    ("mas_openbookqa", "generate", 500),
    ("mas_medqa_mc", "score", 300),
    ("mas_medqa", "generate", 300),
    ("mas_humaneval_plus", "generate", 164),
    ("mas_mbpp_plus", "generate", 378),
    ("mas_commonsenseqa_mc", "score", 1221),
]


def documents_for(delta: float, discordant: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Paired documents needed to detect an accuracy difference `delta` (McNemar, normal approximation)."""
    z_alpha, z_power = norm.ppf(1 - alpha / 2), norm.ppf(power)
    return math.ceil((z_alpha * math.sqrt(discordant) + z_power * math.sqrt(discordant - delta**2)) ** 2 / delta**2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("throughput", nargs="+", type=Path, help="bench_throughput.py JSON result files")
    parser.add_argument("--delta", type=float, default=0.05, help="paired accuracy difference to detect")
    parser.add_argument("--discordant", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--plan-discordant", type=float, default=0.2, help="p_d used for the plan's n")
    parser.add_argument("--rows-per-method", type=int, default=1, help="e.g. 2 for a method and its control")
    args = parser.parse_args()

    print(f"Documents per task to detect a {100 * args.delta:.0f}-point paired difference (alpha 0.05, power 0.8):")
    for p_d in args.discordant:
        print(f"  disagreement on {100 * p_d:.0f}% of documents: n = {documents_for(args.delta, p_d)}")
    n_plan = documents_for(args.delta, args.plan_discordant)
    print(f"plan: n = min({n_plan}, the task's size) per task\n")

    for path in args.throughput:
        payload = json.loads(path.read_text())
        rows = payload["rows"]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        seconds = {(r["method"], r["kind"]): r["seconds_per_doc"] for r in rows}
        print(f"## {path.name}")
        header = "| task | n | " + " | ".join(methods) + " | all rows |"
        print(header)
        print("|" + "---|" * (len(methods) + 3))
        total = 0.0
        for task, kind, size in TASKS:
            n = min(n_plan, size)
            hours = [n * seconds[(m, kind)] / 3600 for m in methods]
            total += sum(hours) * args.rows_per_method
            print(f"| {task} | {n} | " + " | ".join(f"{h:.1f}" for h in hours) + f" | {sum(hours):.1f} |")
        print(f"\ntotal: {total:.0f} CPU hours (one core per run; two runs at a time on this machine)\n")


if __name__ == "__main__":
    main()
