"""What a decode step costs with and without the step-loop fixes: reserved KV room, packed attention and linears.

Variants, all from forks of one trace (the upstream agents' prompts prefilled for a batch of GSM8K questions, so
batch and trace length are identical), each `generate` taking k steps:
- `stock`: the `torch.cat` cache (`KVTrace.reserve` disabled) and transformers' own `sdpa` attention;
- `reserve`: KV room reserved, so each step writes its position in place (`diffmas_eval.core.trace`);
- `reserve+packed-attn`: also unmasked one-position queries take transformers' packed-GQA path instead of the
  `enable_gqa` kernel (`diffmas_eval.core.attention`; the backends' default on CPU for 16-bit models). It only
  matters when the batch has no padding (transformers passes no mask then): batch 1, or rows of equal length.
- `reserve+packed-attn+packed-linear`: also every linear runs with a oneDNN-packed weight
  (`diffmas_eval.core.linear`; the backends' default on CPU).
Also times the attention call alone (`F.scaled_dot_product_attention` at the step's shapes, no mask) with
`enable_gqa` vs packed query heads, which is the measurement behind the attention change.
"""

from __future__ import annotations

import dataclasses
import time

import _common as c
import torch


def _attention_alone(backbone, batch: int, length: int, repeats: int) -> dict[str, float]:
    """Milliseconds of one unmasked single-query SDPA call at the model's shapes: `enable_gqa` vs packed heads."""
    config = backbone.causal_lm.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    q = torch.randn(batch, heads, 1, head_dim, dtype=backbone.dtype)
    k = torch.randn(batch, kv_heads, length, head_dim, dtype=backbone.dtype)
    v = torch.randn_like(k)
    packed = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    mask = torch.ones((batch, 1, heads // kv_heads, length), dtype=torch.bool)
    calls = {
        "enable_gqa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "packed": lambda: torch.nn.functional.scaled_dot_product_attention(packed, k, v, attn_mask=mask),
    }
    out = {}
    for name, call in calls.items():
        for _ in range(3):
            call()
        began = time.perf_counter()
        for _ in range(repeats):
            call()
        out[name] = (time.perf_counter() - began) / repeats * 1000
    return out


def main() -> None:
    p = c.step_parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument(
        "--same-question",
        action="store_true",
        help="every row holds the first question (no padding, so no attention mask: what batch 1 always is)",
    )
    args = p.parse_args()
    c.setup(args)
    from diffmas_eval.core import trace as trace_module
    from diffmas_eval.core.attention import NAME as PACKED_ATTENTION
    from diffmas_eval.core.backbone import load_backbone
    from diffmas_eval.core.decode import DecodingConfig, generate
    from diffmas_eval.methods import LatentMAS

    backbone = load_backbone(args.pretrained, dtype=args.dtype, device="cpu")
    method = LatentMAS(backbone, latent_steps=0)
    questions = c.gsm8k_questions(max(args.batches))
    if args.same_question:
        questions = questions[:1] * len(questions)
    token = backbone.encode(" the")[:1]
    no_eos = dataclasses.replace(backbone, eos_token_ids=frozenset())
    reserve = trace_module.KVTrace.reserve
    default_attention = backbone.model.config._attn_implementation

    linears = [m for m in backbone.model.modules() if isinstance(m, torch.nn.Linear)]
    default_linear = type(linears[0])  # PackedCPULinear unless this PyTorch build lacks oneDNN

    def configure(room: bool, packed_attention: bool, packed_linear: bool = False) -> None:
        trace_module.KVTrace.reserve = reserve if room else (lambda self, upcoming: None)
        for module in linears:
            module.__class__ = default_linear if packed_linear else torch.nn.Linear
        wanted = PACKED_ATTENTION if packed_attention and default_attention == PACKED_ATTENTION else "sdpa"
        if backbone.model.config._attn_implementation != wanted:
            backbone.model.set_attn_implementation(wanted)

    rows, payload = [], {"steps": args.steps, "repeats": args.repeats, "per_batch": {}}
    for batch in args.batches:
        with torch.inference_mode():
            trace = c.upstream_trace(method, questions[:batch], args.trace_agents)

            def decode(room: bool, packed_attention: bool, packed_linear: bool = False, trace=trace, batch=batch):
                configure(room, packed_attention, packed_linear)
                generate(no_eos, [token] * batch, trace.fork(), DecodingConfig(max_new_tokens=args.steps + 1))

            variants = {
                "stock": lambda: decode(False, False),
                "reserve": lambda: decode(True, False),
                "reserve+packed-attn": lambda: decode(True, True),
                "reserve+packed-attn+packed-linear": lambda: decode(True, True, True),
            }
            for fn in variants.values():  # warm-up
                fn()
            times, _ = c.interleaved(variants, args.repeats)
            configure(True, True, True)
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
            f"| {batch} | {trace.length} | SDPA call alone, no mask: enable_gqa vs packed | "
            f"{attention['enable_gqa']:.2f} ms vs {attention['packed']:.2f} ms | "
            f"{attention['enable_gqa'] / attention['packed']:.2f}x |"
        )
    c.write_result(
        args,
        "decode_step",
        payload,
        [
            f"Median of {args.repeats} interleaved repeats, {args.steps} decode steps per run (plus one prefill of a "
            "1-token block). Rows: "
            + ("the same question (no padding)." if args.same_question else "different questions (left-padded)."),
            "",
            "| batch | trace length | variant | ms per step | speed-up vs stock |",
            "|---|---|---|---|---|",
            *rows,
        ],
    )


if __name__ == "__main__":
    main()
