"""What a batched decode step costs with and without the two step-loop fixes: reserved KV room and fp32 attention.

Variants, all from forks of one trace (the upstream agents' prompts prefilled for a batch of GSM8K questions, so
batch and trace length are identical), each `generate` taking k steps:
- `stock`: the `torch.cat` cache (`KVTrace.reserve` disabled) and transformers' own `sdpa` attention;
- `reserve`: KV room reserved, so each step writes its position in place (`diffmas_eval.core.trace`);
- `reserve+fp32-attn`: also one-position attention in fp32 for 16-bit CPU models (`diffmas_eval.core.attention`;
  the backends' default; in fp32 it is the same as `reserve`).
Also times the attention call alone (`F.scaled_dot_product_attention` at the step's shapes) in the model's dtype vs
fp32, which is the measurement behind the attention change.
"""

from __future__ import annotations

import dataclasses
import time

import _common as c
import torch


def _attention_alone(backbone, batch: int, length: int, repeats: int) -> dict[str, float]:
    """Milliseconds of one single-query SDPA call (GQA, boolean mask) in the model dtype and in float32."""
    config = backbone.causal_lm.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    out = {}
    for name, dtype in (("model dtype", backbone.dtype), ("float32", torch.float32)):
        q = torch.randn(batch, heads, 1, head_dim, dtype=dtype)
        k = torch.randn(batch, kv_heads, length, head_dim, dtype=dtype)
        v = torch.randn_like(k)
        mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
        for _ in range(3):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv_heads != heads)
        began = time.perf_counter()
        for _ in range(repeats):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv_heads != heads)
        out[name] = (time.perf_counter() - began) / repeats * 1000
    return out


def main() -> None:
    p = c.step_parser(__doc__.splitlines()[0], repeats=3)
    args = p.parse_args()
    c.setup(args)
    from diffmas_eval.core import trace as trace_module
    from diffmas_eval.core.attention import NAME as FP32_ATTENTION
    from diffmas_eval.core.backbone import load_backbone
    from diffmas_eval.core.decode import DecodingConfig, generate
    from diffmas_eval.methods import LatentMAS
    from diffmas_eval.prompts import load_prompt_set

    backbone = load_backbone(args.pretrained, dtype=args.dtype, device="cpu")
    method = LatentMAS(backbone, load_prompt_set(None), latent_steps=0)
    questions = c.gsm8k_questions(max(args.batches))
    token = backbone.encode(" the")[:1]
    no_eos = dataclasses.replace(backbone, eos_token_ids=frozenset())
    reserve = trace_module.KVTrace.reserve
    default_attention = backbone.model.config._attn_implementation

    def configure(room: bool, fp32_attention: bool) -> None:
        trace_module.KVTrace.reserve = reserve if room else (lambda self, upcoming: None)
        wanted = FP32_ATTENTION if fp32_attention and default_attention == FP32_ATTENTION else "sdpa"
        if backbone.model.config._attn_implementation != wanted:
            backbone.model.set_attn_implementation(wanted)

    rows, payload = [], {"steps": args.steps, "repeats": args.repeats, "per_batch": {}}
    for batch in args.batches:
        with torch.inference_mode():
            trace = c.upstream_trace(method, questions[:batch], args.trace_agents)

            def decode(room: bool, fp32_attention: bool, trace=trace, batch=batch) -> None:
                configure(room, fp32_attention)
                generate(no_eos, [token] * batch, trace.fork(), DecodingConfig(max_new_tokens=args.steps + 1))

            variants = {
                "stock": lambda: decode(False, False),
                "reserve": lambda: decode(True, False),
                "reserve+fp32-attn": lambda: decode(True, True),
            }
            for fn in variants.values():  # warm-up
                fn()
            times, _ = c.interleaved(variants, args.repeats)
            configure(True, True)
        med = {k: c.median(v) / (args.steps + 1) for k, v in times.items()}
        attention = _attention_alone(backbone, batch, trace.length, 20)
        payload["per_batch"][batch] = {
            "trace_length": trace.length,
            "seconds": times,
            "median_seconds_per_step": med,
            "speedup_vs_stock": {k: med["stock"] / v for k, v in med.items()},
            "attention_call_ms": attention,
        }
        for k, v in med.items():
            rows.append(f"| {batch} | {trace.length} | {k} | {v * 1000:.1f} | {med['stock'] / v:.2f}x |")
        rows.append(
            f"| {batch} | {trace.length} | SDPA call alone: {args.dtype} vs float32 | "
            f"{attention['model dtype']:.2f} ms vs {attention['float32']:.2f} ms | "
            f"{attention['model dtype'] / attention['float32']:.2f}x |"
        )
    c.write_result(
        args,
        "decode_step",
        payload,
        [
            f"Median of {args.repeats} interleaved repeats, {args.steps} decode steps per run (plus one prefill of a "
            "1-token block).",
            "",
            "| batch | trace length | variant | ms per step | speed-up vs stock |",
            "|---|---|---|---|---|",
            *rows,
        ],
    )


if __name__ == "__main__":
    main()
