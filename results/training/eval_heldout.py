"""Held-out multiple-choice accuracy of trained and untrained methods, through the lm-eval backends' own
`loglikelihood` (the path `lm_eval --model diffmas --tasks mas_arc_easy_mc` takes), on the first N ARC-Easy test items.

Each item's context is the task's bare question with `A. ...` option lines (`benchmarks.sources`), the continuations
are the option letters, `answer_format=letter`; accuracy = the gold letter has the highest log-likelihood (lm-eval's
`acc`). The LoRA single agent is the `single-agent` backend with `adapter=DIR`.

    python results/training/eval_heldout.py --condition diffmas --adapter DIR --limit 300 --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from lm_eval.api.instance import Instance

from diffmas_eval.benchmarks.sources import load_rows
from diffmas_eval.lm_backend import backend_class

CONDITIONS = {
    # condition -> (lm-eval model name, needs an adapter)
    "diffmas": ("diffmas", True),
    "diffmas-frozen": ("diffmas", True),
    "single-agent-lora": ("single-agent", True),
    "latent-mas": ("latent-mas", False),
    "single-agent": ("single-agent", False),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--condition", choices=CONDITIONS, required=True)
    parser.add_argument("--adapter")
    parser.add_argument("--benchmark", default="arc_easy")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--latent_steps", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    model, needs_adapter = CONDITIONS[args.condition]
    if needs_adapter and not args.adapter:
        parser.error(f"--condition {args.condition} needs --adapter DIR")
    model_args = {"dtype": args.dtype, "batch_size": args.batch_size, "seed": 1234}
    if model in ("diffmas", "latent-mas"):
        model_args["latent_steps"] = args.latent_steps
    if needs_adapter:
        model_args["adapter"] = args.adapter
    lm = backend_class(model)(**model_args)

    docs = load_rows(args.benchmark)[: args.limit]
    requests = []
    for doc_id, doc in enumerate(docs):
        doc = {**doc, "answer_format": "letter"}
        for letter in doc["letters"]:
            requests.append(
                Instance(
                    request_type="loglikelihood",
                    doc=doc,
                    arguments=(doc["query"], f" {letter}"),
                    idx=len(requests),
                    metadata=(f"{args.benchmark}_heldout", doc_id, 1),
                )
            )
    began = time.perf_counter()
    scores = lm.loglikelihood(requests)
    seconds = time.perf_counter() - began
    correct, predictions, offset = [], [], 0
    for doc in docs:
        n = len(doc["letters"])
        logliks = [score for score, _ in scores[offset : offset + n]]
        offset += n
        predictions.append(doc["letters"][logliks.index(max(logliks))])
        correct.append(int(predictions[-1] == doc["gold"]))
    acc = sum(correct) / len(correct)
    result = {
        "condition": args.condition,
        "benchmark": args.benchmark,
        "split": "test",
        "n": len(docs),
        "acc": acc,
        "acc_stderr": math.sqrt(acc * (1 - acc) / max(len(docs) - 1, 1)),
        "adapter": args.adapter,
        "model": model,
        "model_args": model_args,
        "wall_seconds": round(seconds, 1),
        "per_item_correct": correct,
        "per_item_prediction": predictions,
        "ids": [doc["id"] for doc in docs],
        "config": lm.get_model_info()["diffmas"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(f"{args.condition}: acc {acc:.4f} on n={len(docs)} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
