"""Target 2: docs/s at batch size 8 is at least 3x batch size 1 (single agent, TextMAS, LatentMAS), same greedy outputs.

Each method is one lm-eval backend of ours; the same object runs `generate_until` on the same GSM8K requests at
batch size 1 and at batch size 8, interleaved. Greedy decoding, no stop strings, small budgets (so every row of a
batch usually runs to the budget, as in a long-budget evaluation).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import _common as c


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--max-gen-toks", type=int, default=16, help="final agent budget")
    p.add_argument("--upstream-budget", type=int, default=16, help="TextMAS upstream max_new_tokens")
    p.add_argument("--latent-steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--methods", nargs="+", default=["single-agent", "text-mas", "latent-mas"])
    p.set_defaults(repeats=2)
    args = p.parse_args()
    c.setup(args)
    requests = c.generate_requests(c.gsm8k_questions(args.n), args.max_gen_toks)
    payload, rows, split_rows = {"methods": {}}, [], []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            extra = {"latent_steps": args.latent_steps} if method == "latent-mas" else {}
            lm = c.make_backend(
                method, args, Path(tmp) / f"{method}.jsonl", max_new_tokens=args.upstream_budget, **extra
            )

            timer = c.ForwardTimer([lm.backbone.causal_lm, lm.backbone.decoder])
            split: dict[str, dict[str, float]] = {}

            def run(batch_size: int, lm=lm, timer=timer, split=split) -> list[str]:
                lm.batch_size = batch_size
                c.forget_finished(lm)
                before, began = timer.snapshot(), time.perf_counter()
                outputs = lm.generate_until(requests, disable_tqdm=True)
                wall = time.perf_counter() - began
                after = timer.snapshot()
                (pre_s, pre_n), (step_s, step_n) = (
                    [after[k][i] - before[k][i] for i in (0, 1)] for k in ("prefill", "step")
                )
                split[f"batch {batch_size}"] = {  # the last repeat's split of wall time
                    "wall_s": wall,
                    "prefill_s": pre_s,
                    "prefill_calls": pre_n,
                    "step_s": step_s,
                    "step_calls": step_n,
                    "other_s": wall - pre_s - step_s,
                }
                return outputs

            times, outputs = c.interleaved(
                {"batch 1": lambda: run(1), f"batch {args.batch}": lambda: run(args.batch)}, args.repeats
            )
            med = {k: c.median(v) for k, v in times.items()}
            docs_per_s = {k: args.n / v for k, v in med.items()}
            speedup = docs_per_s[f"batch {args.batch}"] / docs_per_s["batch 1"]
            same = outputs["batch 1"] == outputs[f"batch {args.batch}"]
            differing = [i for i, (a, b) in enumerate(zip(*outputs.values(), strict=True)) if a != b]
            payload["methods"][method] = {
                "seconds": times,
                "docs_per_second": docs_per_s,
                "speedup": speedup,
                "identical_outputs": same,
                "differing_docs": differing,
                "target_met": speedup >= 3 and same,
                "split_last_repeat": split,
                "generated_tokens": [len(lm.backbone.encode(text)) for text in outputs["batch 1"]],
            }
            for label, part in split.items():
                split_rows.append(
                    f"| {method} | {label} | {part['wall_s']:.1f} | "
                    f"{part['prefill_s']:.1f} ({part['prefill_calls']}) | "
                    f"{part['step_s']:.1f} ({part['step_calls']}) | "
                    f"{1000 * part['step_s'] / max(part['step_calls'], 1):.0f} | {part['other_s']:.1f} |"
                )
            rows.append(
                f"| {method} | {docs_per_s['batch 1']:.3f} | {docs_per_s[f'batch {args.batch}']:.3f} | "
                f"{speedup:.2f}x | {'yes' if same else f'NO (docs {differing})'} | "
                f"{'yes' if speedup >= 3 and same else 'NO'} |"
            )
            del lm
            # Written after every method, so a run cut short keeps the methods it finished.
            md = [
                f"{args.n} GSM8K problems, greedy, final budget {args.max_gen_toks}, TextMAS upstream budget "
                f"{args.upstream_budget}, LatentMAS m={args.latent_steps}; median of {args.repeats} interleaved "
                "repeats.",
                "",
                f"| method | docs/s batch 1 | docs/s batch {args.batch} | ratio | identical outputs | >= 3x |",
                "|---|---|---|---|---|---|",
                *rows,
                "",
                "Where the time goes (last repeat): forwards of a multi-position block (prompt prefills) vs "
                "single-position forwards (decode and latent steps), timed around the whole model call; `other` is "
                "everything else (token choice, bookkeeping, the side-car).",
                "",
                "| method | batch | wall s | prefill s (calls) | step s (calls) | ms/step | other s |",
                "|---|---|---|---|---|---|---|",
                *split_rows,
            ]
            c.write_result(args, "batching", payload, md)


if __name__ == "__main__":
    main()
