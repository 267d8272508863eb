"""How far a `diffmas-eval reproduce` config has got, and what the rest costs at the rates its pieces measured.

For each (run, task) of the config (a run evaluated in parts: its parts together): the documents its committed results
cover (the largest finished limit), the target, the seconds per document the piece measured (its results'
`wall_seconds` over its requests), and the evaluation hours left at that rate. A piece never run has no rate of its
own; it is costed at the same run's mean rate over its other pieces of the same request kind (generation or letter
scoring), else at the mean of the runs of the same method (model) for that kind, else listed as unmeasured. Rates are
one process's wall time, as the pieces ran (mostly one core each, beside one other job), on whatever machine ran them:
a guide for planning sessions, not a benchmark.

A run that loads trained artefacts (an adapter, a fuser) says where they are: `here`, `to train` (absent, and no
result of the run records one), or `gone` (absent, and the run's results record the ones they were made with: weights
are not committed, so such a row cannot grow; a retrained artefact is another row). The hours left leave `gone` rows
out and count them apart.

    python benchmarks/leaderboard_progress.py results/qwen-cpu.yaml [--out DIR] [--only RUN,...] [--pending]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import pandas as pd

from diffmas_eval.reproduce import ARTEFACT_ARGS, Piece, artefacts_match, load_config, plan
from diffmas_eval.settings import split_budget

ROOT = Path(__file__).resolve().parents[1]
_SCORED = "_mc"  # letter-scored (loglikelihood) variants end in this


def _measured(piece: Piece, artefacts: dict[str, str]) -> tuple[int, float | None]:
    """(documents covered, seconds per document) from a piece's finished results files: the documents of the largest
    one made with the trained artefacts now at the run's paths (any, when those are absent) and the piece's final-agent
    budget (results under an older budget count as not done: the piece reruns them), the rate of the largest one
    whatever its artefacts and budget (a retrained adapter costs the same). `artefacts`: the piece's
    `artefact_fingerprints_here()`."""
    done, rate, largest = 0, None, 0
    budget = split_budget(piece.gen_kwargs)[1]
    for path in piece.directory.glob("**/results_*.json"):
        results = json.loads(path.read_text())
        config = results["config"]
        totals = (config.get("diffmas") or {}).get("totals") or {}
        documents = int(totals.get("requests") or config.get("limit") or 0)
        if artefacts_match(config, artefacts) and split_budget(config.get("gen_kwargs"))[1] == budget:
            done = max(done, documents)
        seconds = totals.get("wall_seconds") or results.get("total_evaluation_time_seconds")
        if documents > largest and seconds:
            largest, rate = documents, float(seconds) / documents
    return done, rate


def _artefacts(piece: Piece, out: Path, here: dict[str, str]) -> str:
    """`here`, `to train`, `gone` or "" (the run loads no trained artefact); see the module's docstring. `here`: the
    piece's `artefact_fingerprints_here()`."""
    if not any(piece.model_args.get(arg) for arg in ARTEFACT_ARGS):
        return ""
    if here:
        return "here"
    for path in (out / piece.run).glob("**/results_*.json"):
        recorded = json.loads(path.read_text())["config"].get("diffmas") or {}
        if any(recorded.get(f"{arg}_fingerprint") for arg in ARTEFACT_ARGS):
            return "gone"
    return "to train"


def progress(config_path: Path, out: Path | None = None, only: list[str] | None = None) -> pd.DataFrame:
    """One row per piece: target and done documents, seconds per document and where that rate comes from, hours left."""
    config = load_config(config_path)
    out = out or ROOT / "results" / config["name"]
    records = []
    artefacts: dict[str, tuple[dict[str, str], str]] = {}  # per run (its pieces share them): fingerprints, status
    for piece in plan(config, out, only=only, check_artefacts=False):
        if piece.run not in artefacts:  # fingerprinting reads the weights: once per run
            here = piece.artefact_fingerprints_here()
            artefacts[piece.run] = here, _artefacts(piece, out, here)
        here, status = artefacts[piece.run]
        done, rate = _measured(piece, here)
        # A run's parts start after the documents its task's piece evaluated whole before it had a part size.
        before = piece.covered if piece.part and piece.part[0] == piece.covered else 0
        records.append(
            {
                "run": piece.run,
                "model": piece.model,
                "task": piece.task,
                "kind": "score" if piece.task.endswith(_SCORED) else "generate",
                "target": piece.documents + before if before else piece.documents,
                "done": min(done, piece.documents or done) + before,
                "s/doc": rate,
                "rate from": "piece" if rate else None,
                "artefacts": status,
            }
        )
    # A run evaluated in parts (`part_size`): one line per (run, task), its parts' documents summed, rates averaged.
    frame = (
        pd.DataFrame(records)
        .groupby(["run", "model", "task", "kind", "artefacts"], sort=False, as_index=False)
        .agg({"target": "sum", "done": "sum", "s/doc": "mean", "rate from": "first"})
    )
    records = frame.to_dict("records")
    means = defaultdict(list)
    for rec in records:
        if pd.notna(rec["s/doc"]):
            means["run", rec["run"], rec["kind"]].append(rec["s/doc"])
            means["model", rec["model"], rec["kind"]].append(rec["s/doc"])
    for i, rec in frame.iterrows():
        for level in ("run", "model"):
            rates = means.get((level, rec[level], rec["kind"]))
            if pd.isna(frame.at[i, "s/doc"]) and rates:
                frame.at[i, "s/doc"] = sum(rates) / len(rates)
                frame.at[i, "rate from"] = f"{level}'s {rec['kind']} mean"
    frame["hours left"] = (frame["target"] - frame["done"]) * frame["s/doc"] / 3600
    return frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, help="the pieces' directory (default: results/<config name>)")
    parser.add_argument("--only", help="comma-separated run names")
    parser.add_argument("--pending", action="store_true", help="list only pieces with documents left")
    args = parser.parse_args()
    frame = progress(args.config, args.out, args.only.split(",") if args.only else None)
    spent = (frame["done"] * frame["s/doc"]).where(frame["rate from"] == "piece").sum() / 3600
    shown = frame[frame["done"] < frame["target"]] if args.pending else frame
    with pd.option_context("display.width", 200, "display.max_rows", None):
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    gone = frame[frame["artefacts"] == "gone"]
    growing = frame[frame["artefacts"] != "gone"]
    unmeasured = growing[(growing["done"] < growing["target"]) & growing["s/doc"].isna()]
    left = growing["hours left"].sum()
    print(f"\nevaluation hours the committed pieces took (their largest results file each): {spent:.1f}")
    print(f"documents done: {int(frame['done'].sum())} of {int(frame['target'].sum())}")
    runs = f" ({', '.join(sorted(set(unmeasured['run'])))})" if len(unmeasured) else ""
    print(
        f"hours left at the measured rates: {0 if math.isnan(left) else left:.1f}, plus {len(unmeasured)} unmeasured "
        f"pieces{runs}"
    )
    if len(gone):
        print(
            f"rows whose trained artefacts are gone (they cannot grow; not in the hours left): "
            f"{', '.join(dict.fromkeys(gone['run']))}: {int(gone['done'].sum())} of their "
            f"{int(gone['target'].sum())} documents done"
        )


if __name__ == "__main__":
    main()
