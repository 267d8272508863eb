"""Throughput per method at one batch size, for planning a leaderboard: seconds per document for generation and for
multiple-choice scoring, and tokens/s, through the lm-eval backends as an evaluation runs them.

For each method (single agent, TextMAS, LatentMAS at m = 0 and m > 0) it evaluates `--n` GSM8K problems (greedy,
`--budget` tokens for the final agent, TextMAS upstream agents `--upstream-budget` each) and `--n` ARC-Easy items by
letter log-likelihood, at `--batch` rows, interleaved and repeated; it reports the median seconds per document and
the tokens/s of each phase (prompt tokens prefilled, tokens generated, continuation tokens scored).

    python benchmarks/bench_throughput.py --pretrained qwen2.5-coder-0.5b-instruct --dtype bfloat16 --batch 8
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import _common as c

METHODS = {
    "single-agent": ("single-agent", {}),
    "text-mas": ("text-mas", {}),
    "latent-mas-m0": ("latent-mas", {"latent_steps": 0}),
    "latent-mas-m10": ("latent-mas", {"latent_steps": 10}),
}


def _run(lm, requests, kind):
    """One timed evaluation of `requests`, recomputed from scratch; returns the backend's totals."""

    def call():
        c.forget_finished(lm)
        lm.totals.clear()
        if kind == "generate":
            lm.generate_until(requests, disable_tqdm=True)
        else:
            lm.loglikelihood(requests, disable_tqdm=True)
        return dict(lm.totals)

    return call


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--budget", type=int, default=256, help="final agent's max_gen_toks")
    p.add_argument("--upstream-budget", type=int, default=128, help="TextMAS upstream agents' max_new_tokens")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.set_defaults(repeats=1)
    args = p.parse_args()
    c.setup(args)
    generate = c.generate_requests(c.gsm8k_questions(args.n), args.budget)
    score = c.loglikelihood_requests(c.arc_easy_items(args.n))
    rows, payload = [], {}
    times, results = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        # One backend at a time: four copies of a 1.5B model (plus packed CPU weights) would not fit in memory.
        for name in args.methods:
            method, extra = METHODS[name]
            lm = c.make_backend(
                method,
                args,
                Path(tmp) / f"{name}.jsonl",
                batch_size=args.batch,
                max_new_tokens=args.upstream_budget,
                **extra,
            )
            variants = {f"{name}/generate": _run(lm, generate, "generate"), f"{name}/score": _run(lm, score, "score")}
            measured, outputs = c.interleaved(variants, args.repeats)
            times.update(measured)
            results.update(outputs)
            del lm
    for variant, seconds in times.items():
        name, kind = variant.split("/")
        totals = results[variant]
        median = c.median(seconds)
        docs = args.n
        row = {
            "method": name,
            "kind": kind,
            "seconds_per_doc": median / docs,
            "prompt_tokens_per_doc": totals.get("prompt_tokens", 0) / docs,
            "generated_tokens_per_doc": totals.get("generated_tokens", 0) / docs,
            "latent_steps_per_doc": totals.get("latent_steps", 0) / docs,
            "tokens_per_s": (totals.get("prompt_tokens", 0) + totals.get("generated_tokens", 0)) / median,
            "final_stopped": totals.get("final_stopped", 0),
        }
        rows.append(row)
    payload["rows"] = rows
    markdown = [
        f"backbone {args.pretrained or 'default'}, {args.dtype}, batch {args.batch}, {args.n} GSM8K problems "
        f"(final budget {args.budget}, TextMAS upstream {args.upstream_budget}) and {args.n} ARC-Easy MC items, "
        f"median of {args.repeats} interleaved repeats",
        "",
        "| method | kind | s / doc | prompt tok / doc | generated tok / doc | latent steps / doc | tok/s | stopped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        markdown.append(
            f"| {r['method']} | {r['kind']} | {r['seconds_per_doc']:.2f} | {r['prompt_tokens_per_doc']:.0f} | "
            f"{r['generated_tokens_per_doc']:.0f} | {r['latent_steps_per_doc']:.0f} | {r['tokens_per_s']:.0f} | "
            f"{r['final_stopped']}/{args.n} |"
        )
    name = f"throughput_{(args.pretrained or 'default').replace('/', '_')}_b{args.batch}"
    print("\n".join(markdown))
    print(c.write_result(args, name, payload, markdown))


if __name__ == "__main__":
    main()
