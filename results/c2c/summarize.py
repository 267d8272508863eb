"""Summarise the C2C evidence (results/c2c-cpu/, written by `bash results/c2c/run.sh eval-all`).

    python results/c2c/summarize.py --results results/c2c-cpu --fuser runs/c2c/fuser --out results/c2c/summary.md

Per benchmark and run: accuracy (letter log-likelihood), wall seconds per question (side-car, batch of 8), fuser
seconds per question; paired comparisons of C2C against every other row on the same documents (bootstrap 95% CI of
the accuracy difference, exact McNemar p-value); and the number of paired questions a 3-point difference needs
(two-sided alpha 0.05, power 0.8), from the observed rate of discordant pairs.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
from pathlib import Path

import numpy as np

from diffmas_eval.reporting.stats import paired_compare

RUNS = ["receiver", "sharer", "t2t", "c2c", "c2c-other-doc"]
LABELS = {
    "receiver": "receiver alone (Qwen2.5-Coder-0.5B)",
    "sharer": "sharer alone (Qwen2.5-Coder-1.5B)",
    "t2t": "T2T (sharer writes 48 tokens, receiver reads)",
    "c2c": "C2C (trained fuser)",
    "c2c-other-doc": "C2C, other_doc control",
}
TASKS = ["mas_arc_challenge_mc", "mas_openbookqa_mc"]
Z_ALPHA, Z_POWER = 1.959964, 0.841621  # two-sided 5%, power 80%


def paired_n(discordant: float, difference: float) -> int:
    """Paired questions for McNemar to detect `difference` given the rate of discordant pairs (normal approximation,
    Connor 1987): n = (z_a sqrt(p_d) + z_b sqrt(p_d - d^2))^2 / d^2."""
    return math.ceil(
        (Z_ALPHA * math.sqrt(discordant) + Z_POWER * math.sqrt(discordant - difference**2)) ** 2 / difference**2
    )


def load_piece(directory: Path, task: str) -> tuple[dict[int, float], dict, list[dict]] | None:
    """(doc_id -> acc, results config, side-car records) of one piece, or None if it has not run."""
    results = sorted(glob.glob(str(directory / "**" / "results_*.json"), recursive=True))
    samples = sorted(glob.glob(str(directory / "**" / f"samples_{task}_*.jsonl"), recursive=True))
    if not results or not samples:
        return None
    config = json.loads(Path(results[-1]).read_text())["config"]
    acc = {}
    for line in Path(samples[-1]).read_text().splitlines():
        sample = json.loads(line)
        acc[int(sample["doc_id"])] = float(sample["acc"])
    sidecar = directory / "sidecar.jsonl"
    records = [json.loads(line) for line in sidecar.read_text().splitlines()] if sidecar.is_file() else []
    run_key = config["diffmas"].get("run_key")
    return acc, config, [r for r in records if r.get("run_key") == run_key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="results/c2c-cpu")
    parser.add_argument("--fuser", default="runs/c2c/fuser")
    parser.add_argument("--out", default="results/c2c/summary.md")
    args = parser.parse_args()
    root = Path(args.results)
    lines = ["# C2C evidence: held-out ARC-Challenge and OpenBookQA (multiple choice, letter log-likelihood)", ""]
    manifest_path = Path(args.fuser) / "manifest.json"
    if not manifest_path.is_file():
        manifest_path = Path(__file__).resolve().parent / "fuser" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    counts = manifest["data"]["counts"]
    logits = manifest["gate_logits"]
    open_k = sum(v > 0 for v in logits["key"])
    open_v = sum(v > 0 for v in logits["value"])
    lines += [
        f"Fuser: {manifest['fuser_parameters']:,} parameters ({manifest['fuser']['hidden_dim']}-wide, "
        f"{manifest['fuser']['num_layers']} layers, {manifest['fuser']['ffn']}), trained {manifest['steps']} steps on "
        f"{manifest['data']['items']} items ({', '.join(manifest['data']['sources'])}; dropped as evaluation items: "
        f"{counts['dropped_as_eval_items']}); open hard gates after training: K {open_k}/{len(logits['key'])}, "
        f"V {open_v}/{len(logits['value'])}.",
        "",
    ]
    for task in TASKS:
        pieces = {run: load_piece(root / run / task, task) for run in RUNS}
        pieces = {run: piece for run, piece in pieces.items() if piece is not None}
        if not pieces:
            continue
        lines += [
            f"## {task}",
            "",
            "| run | acc % (n) | s / question | fuser s / question | C2C minus run [95% CI], McNemar p "
            "(C2C only / run only) |",
        ]
        lines += ["|---|---|---|---|---|"]
        c2c = pieces.get("c2c")
        for run, (acc, _config, records) in pieces.items():
            values = np.array(list(acc.values()))
            stderr = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
            seconds = np.mean([r["wall_seconds"] for r in records]) if records else float("nan")
            fuser = np.mean([(r.get("extra") or {}).get("fuser_seconds", 0.0) for r in records]) if records else 0.0
            comparison = "-"
            if c2c is not None and run != "c2c":
                shared = sorted(set(acc) & set(c2c[0]))
                result = paired_compare([c2c[0][d] for d in shared], [acc[d] for d in shared])
                comparison = (
                    f"{100 * result.difference:+.1f} [{100 * result.ci_low:+.1f}, {100 * result.ci_high:+.1f}], "
                    f"p={result.p_value:.2f} ({result.a_only}/{result.b_only})"
                )
                if run == "receiver":
                    discordant = (result.a_only + result.b_only) / len(shared)
                    needed = paired_n(max(discordant, 0.01), 0.03)
            lines.append(
                f"| {LABELS[run]} | {100 * values.mean():.1f} ± {100 * stderr:.1f} ({len(values)}) | {seconds:.2f} | "
                f"{fuser:.3f} | {comparison} |"
            )
        if c2c is not None and "receiver" in pieces:
            lines += [
                "",
                f"A 3-point paired difference (C2C vs the receiver, alpha 0.05 two-sided, power 0.8) needs about "
                f"{needed:,} questions at the observed rate of discordant pairs ({100 * discordant:.0f}%, "
                "floored at 1%).",
            ]
        lines.append("")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
