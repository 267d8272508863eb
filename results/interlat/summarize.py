"""The Interlat evidence table from the result files under results/interlat/eval/ (written by `run.sh`).

    python results/interlat/summarize.py > results/interlat/summary.md

One row per run of arc-easy.yaml: accuracy ± stderr (n), decoding stability (share of answers that ended before the
budget), time per question, and the message's cost per question from the run's totals (positions between the
markers, sender tokens, one-position sender forwards). Then each row against the receiver alone on the same
documents (paired: McNemar's exact test, with the report's own `paired_compare`). Runs are identified from each
file's own config, never from its path.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from diffmas_eval.reporting.stats import paired_compare

HERE = Path(__file__).resolve().parent
ORDER = ["receiver-alone", "text-plan", "interlat", "interlat-other-doc", "interlat-k4", "interlat-k16"]


def label(info: dict) -> str:
    """The run's name in arc-easy.yaml, from its identity."""
    if info.get("compressed"):
        return f"interlat-k{info['compressed']}"
    return {"none": "receiver-alone", "text": "text-plan", "latent": "interlat", "other_doc": "interlat-other-doc"}[
        info["communication"]
    ]


def answer_letters(results_file: Path) -> str:
    """How often each letter was answered (the last `\\boxed{X}` of each reply), from the run's samples file."""
    counts: Counter[str] = Counter()
    for samples in results_file.parent.glob("samples_*.jsonl"):
        for line in samples.read_text().splitlines():
            boxed = re.findall(r"\\boxed\{([A-E])\}", json.loads(line)["filtered_resps"][0])
            counts[boxed[-1] if boxed else "-"] += 1
    return "/".join(str(counts[letter]) for letter in "ABCD")


def per_document(results_file: Path) -> dict[int, float]:
    """Accuracy per document id, from the run's samples file."""
    scores = {}
    for samples in results_file.parent.glob("samples_*.jsonl"):
        for line in samples.read_text().splitlines():
            sample = json.loads(line)
            scores[sample["doc_id"]] = float(sample["acc"])
    return scores


def main() -> None:
    rows, documents = {}, {}
    for path in sorted((HERE / "eval").glob("*/*/**/results_*.json")):
        result = json.loads(path.read_text())
        info = result["config"]["diffmas"]
        totals = info["totals"]
        ((task, metrics),) = result["results"].items()
        n = totals["requests"]
        documents[label(info)] = per_document(path)
        rows[label(info)] = {
            "task": task,
            "acc": f"{100 * metrics['acc,none']:.1f} ± {100 * metrics['acc_stderr,none']:.1f} (n={n})",
            "extracted": f"{100 * metrics.get('extracted,none', float('nan')):.0f}%",
            "stopped": f"{totals['final_stopped'] / n:.0%}",
            "answer tokens": f"{totals['final_generated_tokens'] / n:.1f}",
            "s / question": f"{totals['wall_seconds'] / n:.2f}",
            "message length": f"{totals.get('message_length', 0) / n:.1f}",
            "sender tokens": f"{totals.get('sender_tokens', 0) / n:.1f}",
            "sender steps": f"{totals.get('sender_steps', 0) / n:.1f}",
            "answers A/B/C/D": answer_letters(path),
        }
    columns = ["row", *next(iter(rows.values()))] if rows else ["row"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for name in [r for r in ORDER if r in rows]:
        print("| " + " | ".join([name, *rows[name].values()]) + " |")
    reference = documents.get("receiver-alone")
    if not reference:
        return
    print("\nPaired against the receiver alone (same documents):\n")
    header = "| row | shared docs | difference (pp) | 95% CI (pp) | p-value | test "
    header += "| discordant (row only / receiver only) |"
    print(header)
    print("|---|---|---|---|---|---|---|")
    for name in [r for r in ORDER if r in rows and r != "receiver-alone"]:
        shared = sorted(set(documents[name]) & set(reference))
        cmp = paired_compare(np.array([documents[name][d] for d in shared]), np.array([reference[d] for d in shared]))
        print(
            f"| {name} | {cmp.n} | {100 * cmp.difference:+.1f} | [{100 * cmp.ci_low:+.1f}, {100 * cmp.ci_high:+.1f}] "
            f"| {cmp.p_value:.3g} | {cmp.test} | {cmp.a_only} / {cmp.b_only} |"
        )


if __name__ == "__main__":
    main()
