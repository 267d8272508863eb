"""Summarise the held-out scores in `scores/`: accuracy, predicted-letter distribution, paired tests.

    python results/training/summarize.py            # prints the table and writes scores/summary.md

Paired comparisons are on the same items (bootstrap 95% CI of the accuracy difference, exact McNemar p-value), each
trained condition against the LoRA single agent (the fair baseline) and against the untrained single agent.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from diffmas_eval.benchmarks.sources import load_rows
from diffmas_eval.reporting.stats import paired_compare

HERE = Path(__file__).resolve().parent
ORDER = ["single-agent", "latent-mas", "single-agent-lora", "diffmas-frozen", "diffmas"]
LABELS = {
    "single-agent": "single agent, untrained",
    "latent-mas": "LatentMAS, untrained (m=0)",
    "single-agent-lora": "LoRA single agent",
    "diffmas-frozen": "DiffMAS, frozen trace (m=0)",
    "diffmas": "DiffMAS, coupled (m=0)",
}
BASELINES = ["single-agent-lora", "single-agent"]


def main() -> None:
    scores = {}
    for name in ORDER:
        path = HERE / "scores" / f"{name}.json"
        if path.is_file():
            scores[name] = json.loads(path.read_text())
    if not scores:
        raise SystemExit(f"no scores in {HERE / 'scores'}: run results/training/run.sh first")
    lines = [
        "| condition | acc (n) | predicted letters | vs LoRA single agent | vs untrained single agent |",
        "|---|---|---|---|---|",
    ]
    for name, result in scores.items():
        predictions = result.get("per_item_prediction", [])
        spread = ", ".join(f"{k} {v}" for k, v in sorted(Counter(predictions).items())) or "-"
        cells = []
        for baseline in BASELINES:
            if baseline == name or baseline not in scores:
                cells.append("-")
                continue
            if scores[baseline]["ids"] != result["ids"]:
                raise SystemExit(f"{name} and {baseline} were scored on different items")
            c = paired_compare(result["per_item_correct"], scores[baseline]["per_item_correct"])
            cells.append(
                f"{100 * c.difference:+.1f} [{100 * c.ci_low:+.1f}, {100 * c.ci_high:+.1f}], "
                f"p={c.p_value:.2f} ({c.a_only}/{c.b_only})"
            )
        acc = f"{100 * result['acc']:.1f} ± {100 * result['acc_stderr']:.1f} (n={result['n']})"
        lines.append(f"| {LABELS[name]} | {acc} | {spread} | {cells[0]} | {cells[1]} |")
    first = next(iter(scores.values()))
    golds = Counter(row["gold"] for row in load_rows(first["benchmark"])[: first["n"]])
    lines += [
        "",
        f"Gold letters of the {first['n']} items: " + ", ".join(f"{k} {v}" for k, v in sorted(golds.items())) + ".",
        "Differences in accuracy points with the paired bootstrap 95% CI; p = exact McNemar; (a/b) = items only this "
        "condition got right / only the baseline got right.",
    ]
    text = "\n".join(lines) + "\n"
    (HERE / "scores" / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
