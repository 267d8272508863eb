"""Time per question of the Interlat rows side by side, on the same questions, in one process (run it with nothing else
on the machine). The evaluation pieces of run.sh ran at different times under different load, so their
seconds are only indicative; this measures the ratios the paper's compression claim is about.

    python results/interlat/latency.py --n 16 --repeats 2 > results/interlat/latency.md

Each row gets a fresh backend (nothing is reused: `reused_requests` is checked), the rows are interleaved over the
repeats (A B C ... A B C ...) so slow drifts of the machine hit them alike, and the best repeat per row is reported.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from lm_eval.api.instance import Instance

from diffmas_eval.benchmarks.sources import load_rows
from diffmas_eval.lm_backend import backend_class

ROOT = Path(__file__).resolve().parents[2]
ROWS = {
    "receiver-alone": {"adapter": "runs/interlat/stage1", "communication": "none"},
    "text-plan": {"adapter": "runs/interlat/stage1", "communication": "text"},
    "interlat": {"adapter": "runs/interlat/stage1"},
    "interlat-k4": {"adapter": "runs/interlat/stage2-k4", "compressed": 4},
    "interlat-k16": {"adapter": "runs/interlat/stage2-k16", "compressed": 16},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=16, help="ARC-Easy test questions (the first N)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()
    rows = load_rows("arc_easy")[: args.n]
    requests = [
        Instance(
            "generate_until",
            {"answer_format": "boxed_letter"},
            (row["query"], {"until": [], "max_gen_toks": 48, "do_sample": False}),
            0,
            ("mas_arc_easy", index, 1),
        )
        for index, row in enumerate(rows)
    ]
    backends = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model_args in ROWS.items():
            adapter = str(ROOT / model_args["adapter"])
            backends[name] = {**model_args, "adapter": adapter}
        seconds: dict[str, list[float]] = {name: [] for name in ROWS}
        for repeat in range(args.repeats):
            for name, model_args in backends.items():
                lm = backend_class("interlat")(
                    **model_args,
                    dtype="bfloat16",
                    batch_size=args.batch_size,
                    sidecar=f"{tmp}/{name}-{repeat}.jsonl",
                )
                began = time.perf_counter()
                lm.generate_until(requests, disable_tqdm=True)
                seconds[name].append((time.perf_counter() - began) / len(requests))
                assert lm.get_model_info()["diffmas"]["totals"].get("reused_requests", 0) == 0
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    print(
        f"# Interlat time per question, side by side ({args.n} ARC-Easy test questions, batch {args.batch_size}, bf16,"
    )
    threads = torch.get_num_threads()
    print(f"# best of {args.repeats}; torch {torch.__version__}, {threads} thread(s), {platform.machine()},")
    print(f"# git {revision.strip()})")
    print()
    print("| row | s / question | vs interlat (full plan) |")
    print("|---|---|---|")
    full = min(seconds["interlat"])
    for name, values in seconds.items():
        print(f"| {name} | {min(values):.3f} | {full / min(values):.2f}x faster |")


if __name__ == "__main__":
    main()
