"""Where greedy outputs at batch 1 and batch 8 part: which computations are bit-identical between the two.

Without `--throughput`, not a timing: for one row of a batch of 8 GSM8K prompts (single agent) and the same row
alone, it compares:
- the prefill's last-position logits (per-row CPU prefill makes them the batch-1 computation);
- the first decode step's logits, and the first attention or MLP module whose output differs;
- the CPU linear kernel (`PackedCPULinear`) at the model's shapes: rows computed among 8 or 150 rows vs alone;
- `scaled_dot_product_attention` for one query: keys alone vs the same keys with masked positions added before
  them (left padding) or after them (right padding), at several lengths.
With `--throughput` it measures the `batch_invariant` model arg instead (`batch_invariant_<dtype>.md`): for each
method (single agent and LatentMAS by default), one backend with the default kernels and one with the mode run
`generate_until` on the same GSM8K requests at batch 1 and batch 8, all four interleaved in one run. It prints docs/s,
batch 8 / batch 1 per kernel set, the mode's cost against the default kernels at each batch size, and how many
outputs are identical at batch 1 and 8.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import _common as c
import torch
from torch.nn import functional as F

LENGTHS = (37, 100, 341, 473, 600, 1100)
EXTRA = (1, 13, 64, 300)


def _sdpa_padding_invariance(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> dict[str, str]:
    torch.manual_seed(0)
    same = {"left padding": 0, "right padding": 0}
    groups = heads // kv_heads
    for n in LENGTHS:
        for extra in EXTRA:
            q = torch.randn(1, kv_heads, groups, head_dim, dtype=dtype)
            k, v = torch.randn(2, 1, kv_heads, n, head_dim, dtype=dtype)
            alone = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(1, 1, groups, n, dtype=torch.bool))
            pad = torch.randn(1, kv_heads, extra, head_dim, dtype=dtype)
            for name, left in (("left padding", True), ("right padding", False)):
                keys = torch.cat([pad, k] if left else [k, pad], dim=2)
                values = torch.cat([pad, v] if left else [v, pad], dim=2)
                mask = torch.zeros(1, 1, groups, n + extra, dtype=torch.bool)
                if left:
                    mask[..., extra:] = True
                else:
                    mask[..., :n] = True
                same[name] += torch.equal(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask), alone)
    total = len(LENGTHS) * len(EXTRA)
    return {name: f"{count}/{total}" for name, count in same.items()}


def _linear_row_invariance(model: torch.nn.Module) -> dict[str, bool]:
    out = {}
    torch.manual_seed(0)
    with torch.inference_mode():
        for module in model.modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            shape = tuple(module.weight.shape)
            if f"{shape}" in out:
                continue
            rows = torch.randn(150, shape[1], dtype=module.weight.dtype)
            alone = torch.cat([module(rows[i : i + 1]) for i in range(8)])
            out[f"{shape}"] = torch.equal(module(rows[:8]), alone) and torch.equal(module(rows)[:8], alone)
    return out


def _throughput(args) -> None:
    """Default kernels vs the batch-invariant mode, batch 1 vs batch 8, every method, interleaved in one run."""
    requests = c.generate_requests(c.gsm8k_questions(args.n), args.max_gen_toks)
    batch = args.batch
    payload: dict = {"n": args.n, "max_gen_toks": args.max_gen_toks, "batch": batch, "methods": {}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            extra = {"latent_steps": args.latent_steps, "max_new_tokens": args.upstream_budget}
            backends = {
                kernels: c.make_backend(
                    method, args, Path(tmp) / f"{method}-{kernels}.jsonl", batch_invariant=invariant, **extra
                )
                for kernels, invariant in (("default", False), ("batch_invariant", True))
            }

            def run(kernels: str, batch_size: int, backends=backends) -> list[str]:
                lm = backends[kernels]
                lm.batch_size = batch_size
                c.forget_finished(lm)
                return lm.generate_until(requests, disable_tqdm=True)

            variants = {
                f"{kernels} batch {size}": (lambda kernels=kernels, size=size: run(kernels, size))
                for kernels in backends
                for size in (1, batch)
            }
            times, outputs = c.interleaved(variants, args.repeats)
            docs_per_s = {name: args.n / c.median(seconds) for name, seconds in times.items()}
            result = {"seconds": times, "docs_per_second": docs_per_s}
            for kernels in backends:
                alone, together = outputs[f"{kernels} batch 1"], outputs[f"{kernels} batch {batch}"]
                result[kernels] = {
                    "speedup": docs_per_s[f"{kernels} batch {batch}"] / docs_per_s[f"{kernels} batch 1"],
                    "identical_outputs": sum(a == b for a, b in zip(alone, together, strict=True)),
                }
            result["cost_vs_default"] = {
                f"batch {size}": docs_per_s[f"default batch {size}"] / docs_per_s[f"batch_invariant batch {size}"]
                for size in (1, batch)
            }
            payload["methods"][method] = result
            for kernels in backends:
                rows.append(
                    f"| {method} | {kernels} | {docs_per_s[f'{kernels} batch 1']:.3f} | "
                    f"{docs_per_s[f'{kernels} batch {batch}']:.3f} | {result[kernels]['speedup']:.2f}x | "
                    f"{result[kernels]['identical_outputs']}/{args.n} |"
                )
            cost = result["cost_vs_default"]
            rows.append(
                f"| {method} | mode's cost vs default | batch 1: {cost['batch 1']:.2f}x | "
                f"batch {batch}: {cost[f'batch {batch}']:.2f}x | | |"
            )
    lines = [
        f"{args.n} GSM8K problems, greedy, final budget {args.max_gen_toks} tokens (TextMAS upstream "
        f"{args.upstream_budget}, LatentMAS m={args.latent_steps}), median of {args.repeats} interleaved repeats.",
        "",
        f"| method | kernels | docs/s batch 1 | docs/s batch {batch} | ratio | identical outputs at 1 and {batch} |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    c.write_result(args, "batch_invariant", payload, lines)


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--row", type=int, default=3, help="which of the 8 rows to follow")
    p.add_argument("--throughput", action="store_true", help="measure the batch_invariant mode instead (see above)")
    p.add_argument("--methods", nargs="+", default=["single-agent", "latent-mas"], help="--throughput methods")
    p.add_argument("--batch", type=int, default=8, help="--throughput batch size compared with 1")
    p.add_argument("--max-gen-toks", type=int, default=64, help="--throughput final agent budget")
    p.add_argument("--upstream-budget", type=int, default=64, help="--throughput TextMAS upstream budget")
    p.add_argument("--latent-steps", type=int, default=10, help="--throughput LatentMAS m")
    p.set_defaults(repeats=2)
    args = p.parse_args()
    c.setup(args)
    if args.throughput:
        _throughput(args)
        return
    from diffmas_eval.core.backbone import load_backbone
    from diffmas_eval.core.trace import append_prompts, extend_trace

    backbone = load_backbone(args.pretrained, dtype=args.dtype, device="cpu")
    prompts = [backbone.render_chat(q, system=None, enable_thinking=None) for q in c.gsm8k_questions(8)]
    captured: dict[str, torch.Tensor] = {}
    for name, module in backbone.decoder.named_modules():
        if name.endswith(".self_attn") or name.endswith(".mlp"):
            module.register_forward_hook(
                lambda mod, inputs, output, name=name: captured.__setitem__(
                    name, (output[0] if isinstance(output, tuple) else output).detach().clone()
                )
            )

    def first_step(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        with torch.inference_mode():
            trace, prefill = append_prompts(backbone, None, [prompts[r] for r in rows], output="logits")
            ids = prefill.argmax(-1)[:, None]
            captured.clear()
            _, step = extend_trace(backbone, trace, torch.ones_like(ids), input_ids=ids, output="logits")
        return prefill, step, dict(captured)

    alone = first_step([args.row])
    batched = first_step(list(range(8)))
    first_diff = next(
        (
            (name, float((alone[2][name][0, -1].float() - batched[2][name][args.row, -1].float()).abs().max()))
            for name in alone[2]
            if not torch.equal(alone[2][name][0, -1], batched[2][name][args.row, -1])
        ),
        None,
    )
    config = backbone.causal_lm.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    payload = {
        "row": args.row,
        "prefill_logits_identical": torch.equal(alone[0][0], batched[0][args.row]),
        "first_step_logits_identical": torch.equal(alone[1][0], batched[1][args.row]),
        "first_step_max_abs_logit_diff": float((alone[1][0].float() - batched[1][args.row].float()).abs().max()),
        "first_differing_module": first_diff,
        "linear_rows_identical_among_8_and_150": _linear_row_invariance(backbone.model),
        "sdpa_bit_identical_with_masked_positions": _sdpa_padding_invariance(
            backbone.dtype, config.num_attention_heads, config.num_key_value_heads, head_dim
        ),
    }
    lines = [f"Row {args.row} of a batch of 8 GSM8K prompts (single agent) vs that row alone.", ""]
    lines += [f"- {key}: {value}" for key, value in payload.items() if key != "row"]
    c.write_result(args, "batch_invariance", payload, lines)


if __name__ == "__main__":
    main()
