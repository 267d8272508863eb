"""Prompt prefill of a padded batch on CPU: one batched forward vs one forward per row vs batch size 1.

The work is LatentMAS's upstream prefills (3 agents' prompts appended to one trace, m = 0) for a batch of GSM8K
questions. Variants, on the same rows:
- `batched`: one left-padded forward per block (what a GPU wants);
- `per-row`: each row's block computed alone on that row's real positions, assembled into the same padded trace
  (`diffmas_eval.core.trace.append_prompts` on CPU when padding exceeds `PER_ROW_PADDING_THRESHOLD`);
- `batch 1`: the rows one at a time as separate batches (what batch size 1 pays).
Row sets: `consecutive` (the first questions, as a small unsorted run forms a batch), `length-sorted` (neighbours in
length order within a pool of questions, as lm-eval's length-sorted batches of a whole task are) and `equal` (one
question repeated: no padding). The padded fraction of each set is printed, so the threshold can be read off.
"""

from __future__ import annotations

import _common as c
import torch


def _row_sets(method, pool: int, batch: int) -> dict[str, list[str]]:
    questions = c.gsm8k_questions(pool)

    def trace_tokens(question: str) -> int:
        return sum(len(method.render(role, question)) for role in method.upstream_roles)

    ordered = sorted(questions, key=trace_tokens)
    middle = len(ordered) // 2 - batch // 2
    return {
        "consecutive": questions[:batch],
        "length-sorted": ordered[middle : middle + batch],
        "equal": questions[:1] * batch,
    }


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--pool", type=int, default=256, help="questions the length-sorted batch is drawn from")
    p.set_defaults(repeats=3)
    args = p.parse_args()
    c.setup(args)
    from diffmas_eval.core import trace as trace_module
    from diffmas_eval.core.backbone import load_backbone
    from diffmas_eval.methods import LatentMAS

    backbone = load_backbone(args.pretrained, dtype=args.dtype, device="cpu")
    method = LatentMAS(backbone, latent_steps=0)
    agents = len(method.upstream_roles)
    threshold = trace_module.PER_ROW_PADDING_THRESHOLD

    def prefill(questions: list[str], per_row: bool) -> torch.Tensor:
        trace_module.PER_ROW_PREFILL_ON_CPU = per_row
        trace_module.PER_ROW_PADDING_THRESHOLD = -1.0  # every padded block per row, whatever its padding
        try:
            with torch.inference_mode():
                trace, hidden = None, None
                for role in method.upstream_roles:
                    trace, hidden = trace_module.append_prompts(
                        backbone, trace, [method.render(role, q) for q in questions]
                    )
            return hidden
        finally:
            trace_module.PER_ROW_PREFILL_ON_CPU, trace_module.PER_ROW_PADDING_THRESHOLD = True, threshold

    rows, payload = [], {"agents": agents, "threshold": threshold, "sets": {}}
    for name, questions in _row_sets(method, args.pool, args.n).items():
        lengths = [[len(method.render(role, q)) for q in questions] for role in method.upstream_roles]
        real = sum(map(sum, lengths))
        padded = sum(len(block) * max(block) for block in lengths)
        variants = {
            "batched": lambda q=questions: prefill(q, per_row=False),
            "per-row": lambda q=questions: prefill(q, per_row=True),
            "batch 1": lambda q=questions: torch.cat([prefill([one], per_row=False) for one in q]),
        }
        variants["batched"]()  # warm-up
        times, outputs = c.interleaved(variants, args.repeats)
        med = {k: c.median(v) for k, v in times.items()}
        diff = float((outputs["per-row"].float() - outputs["batched"].float()).abs().max())
        padding = padded / real - 1
        payload["sets"][name] = {
            "padding_over_real": padding,
            "seconds": times,
            "median_seconds": med,
            "max_abs_hidden_diff_per_row_vs_batched": diff,
        }
        rows.append(
            f"| {name} | {padding:.1%} | {med['batched']:.2f} | {med['per-row']:.2f} | {med['batch 1']:.2f} | "
            f"{med['batched'] / med['per-row']:.2f}x | {med['batch 1'] / med['per-row']:.2f}x | {diff:.1e} |"
        )
    c.write_result(
        args,
        "prefill",
        payload,
        [
            f"{agents} upstream prompts of LatentMAS appended for {args.n} GSM8K questions; median of {args.repeats} "
            f"interleaved repeats. The backends prefill per row when padding exceeds {threshold:.0%}.",
            "",
            "| rows | padding over real tokens | batched s | per-row s | batch 1 s | batched / per-row | "
            "batch 1 / per-row | max abs diff of last hidden state |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
        ],
    )


if __name__ == "__main__":
    main()
