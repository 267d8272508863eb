"""Target 1: a batched latent step costs at most 1.1x a batched decode step of the same batch and trace length.

Both variants are the real code paths, started from forks of one trace (the upstream agents' prompts prefilled for
a batch of GSM8K questions), so batch and trace length are identical:
- latent: `append_prompts` of one token per row, then `run_latent_steps(k)` (each step: aligner + one
  single-position forward of the decoder body, no LM head);
- decode: `generate` with a one-token prompt and `max_new_tokens = k + 1`, end-of-turn ignored so it always takes
  k steps (each step: one single-position forward with `logits_to_keep=1`, token choice, mask growth).
Both therefore run one single-token block plus k single-position steps. Realignment on adds the `[D, D]` product.
"""

from __future__ import annotations

import dataclasses

import _common as c
import torch


def main() -> None:
    p = c.step_parser(__doc__.splitlines()[0], repeats=5)
    args = p.parse_args()
    c.setup(args)
    from diffmas_eval.core.backbone import load_backbone
    from diffmas_eval.core.decode import DecodingConfig, generate
    from diffmas_eval.core.latent import build_aligner, run_latent_steps
    from diffmas_eval.core.trace import append_prompts
    from diffmas_eval.methods import LatentMAS

    backbone = load_backbone(args.pretrained, dtype=args.dtype, device="cpu")
    method = LatentMAS(backbone, latent_steps=0)
    aligners = {"latent": build_aligner(backbone, realign=False), "latent+realign": build_aligner(backbone, True)}
    questions = c.gsm8k_questions(max(args.batches))
    token = backbone.encode(" the")[:1]
    no_eos = dataclasses.replace(backbone, eos_token_ids=frozenset())
    rows = []
    payload = {"steps": args.steps, "repeats": args.repeats, "per_batch": {}}
    for batch in args.batches:
        with torch.inference_mode():
            trace = c.upstream_trace(method, questions[:batch], args.trace_agents)

            def latent(aligner, trace=trace, batch=batch):
                fork, h = append_prompts(backbone, trace.fork(), [token] * batch, output="hidden")
                run_latent_steps(backbone, fork, h, args.steps, aligner)

            def decode(trace=trace, batch=batch):
                generate(no_eos, [token] * batch, trace.fork(), DecodingConfig(max_new_tokens=args.steps + 1))

            variants = {
                "decode": decode,
                "latent": lambda: latent(aligners["latent"]),
                "latent+realign": lambda: latent(aligners["latent+realign"]),
            }
            for fn in variants.values():  # warm-up
                fn()
            times, _ = c.interleaved(variants, args.repeats)
        med = {k: c.median(v) for k, v in times.items()}
        per_step = {k: v / (args.steps + 1) for k, v in med.items()}
        ratios = {k: med[k] / med["decode"] for k in med}
        payload["per_batch"][batch] = {
            "trace_length": trace.length,
            "trace_real_positions": sum(trace.real_lengths()),
            "seconds": times,
            "median_seconds": med,
            "median_seconds_per_step": per_step,
            "ratio_to_decode": ratios,
            "target_met": ratios["latent"] <= 1.1 and ratios["latent+realign"] <= 1.1,
        }
        for k in med:
            rows.append(
                f"| {batch} | {trace.length} | {k} | {per_step[k] * 1000:.1f} | {ratios[k]:.3f} | "
                f"{'-' if k == 'decode' else ('yes' if ratios[k] <= 1.1 else 'NO')} |"
            )
    md = [
        f"{args.steps + 1} single-position forwards per timed run (one 1-token block + {args.steps} steps), "
        f"median of {args.repeats} interleaved repeats.",
        "",
        "| batch | trace length | variant | ms/step (median) | ratio to decode | <= 1.1x |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    c.write_result(args, "latent_step", payload, md)


if __name__ == "__main__":
    main()
