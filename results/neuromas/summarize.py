"""Summarise the NeuroMAS evidence (`run.sh`): training-reward curves against rollout tokens, held-out accuracy of
every evaluated condition, and paired statistics through `diffmas-report`.

    python results/neuromas/summarize.py      # writes curves.png, summary.md and report/ here
"""

from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WINDOW = 4  # steps in the moving average of the training reward
# The comparisons the experiment is about (the report pairs every row with the untrained single agent only).
PAIRS = [
    ("2x3-grown", "2x3-scratch", "growth: grown vs from scratch at about equal rollout tokens"),
    ("2x2", "untrained-2x2", "RL: the 2x2 graph after GRPO vs untrained"),
    ("2x2", "single", "the trained 2x2 graph vs the single agent trained with the same GRPO (the control)"),
    ("2x3-grown", "single", "the grown 2x3 vs the trained single agent"),
]


def rollout_curves() -> dict[str, list[dict]]:
    return {
        path.parent.name: [json.loads(line) for line in path.read_text().splitlines() if line]
        for path in sorted(HERE.glob("runs/*/rollout_log.jsonl"))
    }


def plot(curves: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, log in curves.items():
        offset = lineage_tokens(name)
        tokens = [offset + r["rollout_tokens"] for r in log]
        rewards = [r["reward"] for r in log]
        smooth = [
            sum(rewards[max(0, i - WINDOW + 1) : i + 1]) / len(rewards[max(0, i - WINDOW + 1) : i + 1])
            for i in range(len(rewards))
        ]
        ax.plot(tokens, smooth, label=name)
    ax.set_xlabel("rollout tokens generated (all nodes; grown runs include the 2x2 run they grew from)")
    ax.set_ylabel(f"training reward (mean over {WINDOW} steps)")
    ax.set_title("NeuroMAS GRPO on mas_arithmetic (SmolLM2-135M, bf16, CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "curves.png", dpi=120)


def lineage_tokens(name: str) -> int:
    """Rollout tokens spent on the runs a grown run started from."""
    manifest = HERE / "runs" / name / "manifest.json"
    if not manifest.is_file():
        return 0
    total = 0
    for parent in json.loads(manifest.read_text()).get("lineage", []):
        log = HERE / "runs" / Path(parent["path"]).name / "rollout_log.jsonl"
        if log.is_file():
            total += json.loads(log.read_text().splitlines()[-1])["rollout_tokens"]
    return total


def evaluations() -> list[tuple[str, dict]]:
    rows = []
    for directory in sorted((HERE / "evals").glob("*")):
        files = sorted(glob.glob(str(directory / "**" / "results_*.json"), recursive=True))
        if files:
            rows.append((directory.name, json.loads(Path(files[-1]).read_text())))
    return rows


def per_problem(condition: str) -> dict[int, float]:
    """Accuracy per held-out problem (doc_id -> 0/1) of one evaluated condition."""
    files = sorted(glob.glob(str(HERE / "evals" / condition / "**" / "samples_*.jsonl"), recursive=True))
    if not files:
        return {}
    rows = [json.loads(line) for line in Path(files[-1]).read_text().splitlines() if line.strip()]
    return {row["doc_id"]: float(row["acc"]) for row in rows}


def paired_lines() -> list[str]:
    """McNemar tests of PAIRS on the problems both conditions scored."""
    from diffmas_eval.reporting.stats import paired_compare

    lines = ["| comparison | a | b | n | a % | b % | a - b (pp) [95% CI] | p (McNemar) | a only / b only |"]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for a, b, what in PAIRS:
        scores_a, scores_b = per_problem(a), per_problem(b)
        shared = sorted(set(scores_a) & set(scores_b))
        if not shared:
            continue
        cmp = paired_compare([scores_a[i] for i in shared], [scores_b[i] for i in shared])
        lines.append(
            f"| {what} | {a} | {b} | {cmp.n} | {100 * cmp.mean_a:.1f} | {100 * cmp.mean_b:.1f} | "
            f"{100 * cmp.difference:+.1f} [{100 * cmp.ci_low:+.1f}, {100 * cmp.ci_high:+.1f}] | {cmp.p_value:.3g} | "
            f"{cmp.a_only} / {cmp.b_only} |"
        )
    return lines


def main() -> None:
    curves = rollout_curves()
    if curves:
        plot(curves)
    lines = ["| condition | held-out acc (%) | n | generated tokens / problem |", "|---|---|---|---|"]
    for name, result in evaluations():
        metrics = result["results"]["mas_arithmetic"]
        totals = result["config"]["diffmas"]["totals"]
        n = totals["requests"]
        lines.append(
            f"| {name} | {100 * metrics['acc,none']:.1f} ± {100 * metrics['acc_stderr,none']:.1f} | {n} | "
            f"{totals['generated_tokens'] / n:.1f} |"
        )
    lines += [
        "",
        "| run | steps | rollout tokens | first-4-step reward | last-4-step reward |",
        "|---|---|---|---|---|",
    ]
    for name, log in curves.items():
        head, tail = log[:WINDOW], log[-WINDOW:]
        lines.append(
            f"| {name} | {log[-1]['step']} | {lineage_tokens(name) + log[-1]['rollout_tokens']} | "
            f"{sum(r['reward'] for r in head) / len(head):.3f} | {sum(r['reward'] for r in tail) / len(tail):.3f} |"
        )
    lines += ["", *paired_lines()]
    (HERE / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if evaluations():
        subprocess.run(
            [sys.executable, "-m", "diffmas_eval.reporting", str(HERE / "evals"), "--out", str(HERE / "report")],
            check=True,
        )


if __name__ == "__main__":
    main()
