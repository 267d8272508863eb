"""Where greedy outputs at batch 1 and batch 8 part: which computations are bit-identical between the two.

Not a timing. For one row of a batch of 8 GSM8K prompts (single agent) and the same row alone, it compares:
- the prefill's last-position logits (per-row CPU prefill makes them the batch-1 computation);
- the first decode step's logits, and the first attention or MLP module whose output differs;
- the CPU linear kernel (`PackedCPULinear`) at the model's shapes: rows computed among 8 or 150 rows vs alone;
- `scaled_dot_product_attention` for one query: keys alone vs the same keys with masked positions added before
  them (left padding) or after them (right padding), at several lengths.
With `--prototype`, it also times greedy decoding of the 8 prompts at batch 1 vs batch 8 (single agent) with the
backends' kernels and with a prototype that is not in the library: one-query attention computed row by row on each
row's real positions, with and without the MLP down-projection row by row. It prints docs/s ratios and how many
outputs match.
"""

from __future__ import annotations

import time

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


def _row_by_row_attention(module, query, key, value, attention_mask, **kwargs):
    """Prototype: a one-position query attends row by row to that row's real keys only (no masked positions)."""
    from diffmas_eval.core.attention import sdpa_packed_single_query

    if query.shape[2] != 1:
        return sdpa_packed_single_query(module, query, key, value, attention_mask, **kwargs)
    rows = []
    for row in range(query.shape[0]):
        keys, values = key[row : row + 1], value[row : row + 1]
        if attention_mask is not None:
            real = attention_mask[row, 0, 0].nonzero().squeeze(1)
            keys, values = keys.index_select(2, real), values.index_select(2, real)
        rows.append(sdpa_packed_single_query(module, query[row : row + 1], keys, values, None, **kwargs)[0])
    return torch.cat(rows), None


def _prototype(backbone, prompts: list[list[int]], budget: int) -> dict[str, dict[str, float]]:
    """Batch 1 vs batch 8 greedy decoding with the backends' kernels and with the row-by-row prototype."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    from diffmas_eval.core.decode import DecodingConfig, generate
    from diffmas_eval.core.linear import PackedCPULinear

    class RowByRowLinear(PackedCPULinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dim() < 3 or x.shape[0] == 1:
                return super().forward(x)
            return torch.cat([super(RowByRowLinear, self).forward(row[None]) for row in x])

    AttentionInterface.register("row_by_row", _row_by_row_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("row_by_row", sdpa_mask)
    down = [m for name, m in backbone.model.named_modules() if name.endswith("mlp.down_proj")]
    default_attention, default_class = backbone.model.config._attn_implementation, type(down[0])
    config = DecodingConfig(max_new_tokens=budget)
    out = {}
    variants = {  # name: (attention row by row, down-projection row by row)
        "backends' kernels": (False, False),
        "attention row by row": (True, False),
        "row-by-row prototype (attention and down-projection)": (True, True),
    }
    for variant, (rows_attention, rows_down) in variants.items():
        backbone.model.set_attn_implementation("row_by_row" if rows_attention else default_attention)
        for module in down:
            module.__class__ = RowByRowLinear if rows_down else default_class
        with torch.inference_mode():
            began = time.perf_counter()
            alone = [generate(backbone, [prompt], None, config)[0].token_ids for prompt in prompts]
            middle = time.perf_counter()
            together = [g.token_ids for g in generate(backbone, prompts, None, config)]
            seconds_8 = time.perf_counter() - middle
        out[variant] = {
            "batch_1_s": middle - began,
            "batch_8_s": seconds_8,
            "ratio": (middle - began) / seconds_8,
            "identical": sum(a == b for a, b in zip(alone, together, strict=True)),
        }
    backbone.model.set_attn_implementation(default_attention)
    for module in down:
        module.__class__ = default_class
    return out


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--row", type=int, default=3, help="which of the 8 rows to follow")
    p.add_argument("--prototype", action="store_true", help="also time the row-by-row prototype (see above)")
    p.add_argument("--max-gen-toks", type=int, default=64, help="greedy budget of the --prototype timing")
    args = p.parse_args()
    c.setup(args)
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
    if args.prototype:
        payload["prototype"] = _prototype(backbone, prompts, args.max_gen_toks)
    lines = [f"Row {args.row} of a batch of 8 GSM8K prompts (single agent) vs that row alone.", ""]
    lines += [f"- {key}: {value}" for key, value in payload.items() if key not in ("row", "prototype")]
    if args.prototype:
        lines += [
            "",
            f"Greedy decoding of the 8 prompts, budget {args.max_gen_toks}, batch 1 vs batch 8:",
            "",
            "| kernels | batch 1 s | batch 8 s | docs/s ratio | identical outputs |",
            "|---|---|---|---|---|",
            *(
                f"| {name} | {v['batch_1_s']:.1f} | {v['batch_8_s']:.1f} | {v['ratio']:.2f}x | {v['identical']}/8 |"
                for name, v in payload["prototype"].items()
            ),
        ]
    c.write_result(args, "batch_invariance", payload, lines)


if __name__ == "__main__":
    main()
