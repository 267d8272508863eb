"""What dropping stopped rows from the running batch saves: a greedy evaluation in the batch-invariant mode, with rows
dropped once they stop (the default in the mode, `diffmas_eval.core.decode.generate`) against the whole batch kept to
its longest row (what decoding did before, and still does outside the mode).

Each variant is its own backend (`single-agent` by default, `--method` for another), batch-invariant, on the first
`--n` GSM8K test questions at `--batch` with the final-agent budget `--budget`; after one untimed warm-up call each
(the first forward packs the weights), the variants alternate over `--repeats` rounds, the backend's side-car cache
forgotten before each. Prints seconds per variant (median), the
ratio kept / dropped measured in the same run, the tokens generated, the row-steps each variant computed, and whether
the texts agree (they must: in the mode a row's output does not depend on its neighbours).

    DIFFMAS_DATA_DIR=../shared/data python benchmarks/bench_compaction.py --pretrained qwen2.5-coder-0.5b-instruct \\
        --dtype bfloat16 --n 16 --batch 8 --budget 512 --repeats 2 --threads 2
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import _common as c


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--method", default="single-agent", help="backend: single-agent, latent-mas, text-mas, ...")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--budget", type=int, default=512, help="final-agent max_gen_toks")
    p.set_defaults(repeats=2)
    args = p.parse_args()
    c.setup(args)
    from diffmas_eval.core import decode

    requests = c.generate_requests(c.gsm8k_questions(args.n), args.budget)
    in_mode = decode.is_batch_invariant
    scratch = Path(tempfile.mkdtemp(prefix="bench_compaction_"))
    backends = {
        name: c.make_backend(args.method, args, scratch / f"{name}.jsonl", batch_size=args.batch, batch_invariant=True)
        for name in ("dropped", "kept")
    }

    def run(name: str):
        lm = backends[name]
        c.forget_finished(lm)
        decode.is_batch_invariant = in_mode if name == "dropped" else (lambda model: False)
        try:
            return lm.generate_until(list(requests), disable_tqdm=True)
        finally:
            decode.is_batch_invariant = in_mode

    for name in backends:  # warm-up: weight packing and first-call allocations, untimed
        backends[name].generate_until(c.generate_requests(c.gsm8k_questions(1), 4), disable_tqdm=True)
    times, outputs = c.interleaved({name: (lambda name=name: run(name)) for name in backends}, args.repeats)
    medians = {name: c.median(values) for name, values in times.items()}
    payload = {
        "method": args.method,
        "n": args.n,
        "batch": args.batch,
        "budget": args.budget,
        "seconds": times,
        "median_seconds": medians,
        "kept_over_dropped": medians["kept"] / medians["dropped"],
        "texts_identical": outputs["dropped"] == outputs["kept"],
    }
    markdown = [
        f"{args.method}, {args.n} GSM8K questions, batch {args.batch}, budget {args.budget}, {args.repeats} "
        "interleaved repeats, batch-invariant mode",
        "",
        "| stopped rows | median s | runs (s) |",
        "|---|---|---|",
        *(
            f"| {name} | {c.fmt(medians[name], 1)} | {', '.join(c.fmt(t, 1) for t in times[name])} |"
            for name in ("kept", "dropped")
        ),
        "",
        f"kept / dropped: **{payload['kept_over_dropped']:.2f}x**; texts identical: {payload['texts_identical']}",
    ]
    c.write_result(args, f"compaction_{args.method}", payload, markdown)


if __name__ == "__main__":
    main()
