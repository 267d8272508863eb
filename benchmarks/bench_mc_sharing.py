"""Target 3: multiple choice through `loglikelihood`: one trace per context vs one per continuation (4 choices).

Same backend, same requests (ARC-Easy items with exactly four options, continuations `A`..`D`), same batch size:
- shared: one `loglikelihood` call with every request; the upstream agents run once per context and the four
  continuations are scored against that one working memory (the normal path);
- per continuation: four `loglikelihood` calls, call j holding only option j of every item, so every continuation
  gets its own upstream run (what a backend that does not share would pay).
The scores of both paths must agree.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import _common as c


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--latent-steps", type=int, default=10)
    p.add_argument("--upstream-budget", type=int, default=16, help="TextMAS upstream max_new_tokens")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--methods", nargs="+", default=["latent-mas", "text-mas"])
    p.set_defaults(repeats=3)
    args = p.parse_args()
    c.setup(args)
    items = [it for it in c.arc_easy_items(4 * args.n) if len(it[1]) == 4][: args.n]
    requests = c.loglikelihood_requests(items)
    per_choice = [[r for r in requests if r.idx == j] for j in range(4)]
    payload, rows = {"items": len(items), "methods": {}}, []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            extra = {"latent_steps": args.latent_steps} if method == "latent-mas" else {}
            lm = c.make_backend(
                method,
                args,
                Path(tmp) / f"{method}.jsonl",
                batch_size=args.batch,
                max_new_tokens=args.upstream_budget,
                **extra,
            )

            def shared(lm=lm) -> list[tuple[float, bool]]:
                c.forget_finished(lm)
                return lm.loglikelihood(requests, disable_tqdm=True)

            def separate(lm=lm) -> list[tuple[float, bool]]:
                scores = {}
                for group in per_choice:
                    c.forget_finished(lm)
                    for request, score in zip(group, lm.loglikelihood(group, disable_tqdm=True), strict=True):
                        scores[id(request)] = score
                return [scores[id(r)] for r in requests]

            times, outputs = c.interleaved({"shared": shared, "per continuation": separate}, args.repeats)
            med = {k: c.median(v) for k, v in times.items()}
            speedup = med["per continuation"] / med["shared"]
            diff = max(abs(a[0] - b[0]) for a, b in zip(outputs["shared"], outputs["per continuation"], strict=True))
            agree = diff <= 1e-3 * max(1.0, max(abs(a[0]) for a in outputs["shared"])) and all(
                a[1] == b[1] for a, b in zip(outputs["shared"], outputs["per continuation"], strict=True)
            )
            payload["methods"][method] = {
                "seconds": times,
                "median_seconds": med,
                "speedup": speedup,
                "max_abs_logprob_difference": diff,
                "scores_agree": agree,
                "target_met": speedup >= 2.5 and agree,
                "all_finite": all(math.isfinite(a[0]) for a in outputs["shared"]),
            }
            rows.append(
                f"| {method} | {med['shared']:.2f} | {med['per continuation']:.2f} | {speedup:.2f}x | {diff:.2e} | "
                f"{'yes' if speedup >= 2.5 and agree else 'NO'} |"
            )
            del lm
    md = [
        f"{len(items)} ARC-Easy items x 4 options, batch size {args.batch}, LatentMAS m={args.latent_steps}, "
        f"TextMAS upstream budget {args.upstream_budget}; median of {args.repeats} interleaved repeats.",
        "",
        "| method | shared s | per-continuation s | speedup | max abs logprob diff | >= 2.5x |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    c.write_result(args, "mc_sharing", payload, md)


if __name__ == "__main__":
    main()
