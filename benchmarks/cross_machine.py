"""Does a leaderboard cell depend on the machine that computed it? Two evaluations of one configuration, each made on
its own machine (its results, samples and side-cars committed, parts joined as the report joins them), compared per
document: the same score, the same number of generated tokens (the committed side-cars keep counts, not text: equal
counts on every document are a proxy for equal text, unequal ones prove a difference), and the paired difference of
the scores (McNemar's exact test, the report's `paired_compare`). Both sides print the CPU kernels their results
record (`packed`: 16-bit weights packed natively; `packed via float32`: a CPU that cannot pack them).

    python benchmarks/cross_machine.py results/qwen-cpu/latent-mas-m10/mas_humaneval_plus \\
        results/qwen-cpu-machines/latent-mas-m10/mas_humaneval_plus
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from diffmas_eval.reporting.load import TaskResult, WarningLog, load_runs
from diffmas_eval.reporting.stats import paired_compare
from diffmas_eval.reporting.tables import build_rows


def cell(directory: Path) -> tuple[TaskResult, set[str], dict]:
    """The one (row, task) a directory holds, its parts joined; the CPU kernels its results files record; the row's
    identity (what the report tells rows apart by)."""
    log = WarningLog()
    rows = build_rows(load_runs([directory], log), all_runs=False, log=log)
    entries = [entry for row in rows for entry in row.entries.values()]
    if len(entries) != 1:
        raise SystemExit(f"{directory}: expected the results of one configuration on one task, found {len(entries)}")
    paths = sorted(directory.rglob("results_*.json"))
    kernels = {str(json.loads(p.read_text())["config"]["diffmas"].get("cpu_kernels")) for p in paths}
    result = entries[0][1]
    if result.samples is None or result.sidecar is None:
        raise SystemExit(f"{directory}: needs samples and a side-car for every document")
    return result, kernels, rows[0].identity


def compare(first: Path, second: Path) -> dict[str, object]:
    """Per-document agreement of two evaluations of one cell, and their paired score difference."""
    (a, kernels_a, identity_a), (b, kernels_b, identity_b) = cell(first), cell(second)
    differ = sorted(k for k in set(identity_a) | set(identity_b) if identity_a.get(k) != identity_b.get(k))
    if differ or a.task != b.task or a.budget != b.budget:
        raise SystemExit(f"not one configuration and task: {differ or [a.task, b.task, a.budget, b.budget]} differ")
    metric = a.headline
    scores = a.samples.merge(b.samples, on=["doc_id", "doc_hash"], suffixes=("_a", "_b"))
    tokens = a.sidecar.merge(b.sidecar, on="doc_id", suffixes=("_a", "_b"))
    paired = paired_compare(scores[f"{metric}_a"].to_numpy(), scores[f"{metric}_b"].to_numpy())
    same_tokens = tokens["final_generated_tokens_a"] == tokens["final_generated_tokens_b"]
    return {
        "documents": len(scores),
        "kernels": f"{'/'.join(sorted(kernels_a))} vs {'/'.join(sorted(kernels_b))}",
        f"{metric} (%)": f"{100 * scores[f'{metric}_a'].mean():.1f} vs {100 * scores[f'{metric}_b'].mean():.1f}",
        "same score": f"{int((scores[f'{metric}_a'] == scores[f'{metric}_b']).sum())}/{len(scores)}",
        "same generated tokens": f"{int(same_tokens.sum())}/{len(tokens)}",
        "difference (pp)": f"{100 * paired.difference:+.1f} [{100 * paired.ci_low:+.1f}, {100 * paired.ci_high:+.1f}]",
        "p-value": f"{paired.p_value:.3g}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path, help="a piece directory (OUT/<run>/<task>), parts included")
    parser.add_argument("second", type=Path, help="the same configuration and task, computed elsewhere")
    args = parser.parse_args()
    print(pd.Series(compare(args.first, args.second)).to_string())


if __name__ == "__main__":
    main()
