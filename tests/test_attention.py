"""16-bit models on CPU: one-position queries use float32 SDPA; prompt blocks and other dtypes are unchanged."""

from __future__ import annotations

import torch

from diffmas_eval.core.attention import NAME
from diffmas_eval.core.backbone import load_backbone
from diffmas_eval.core.trace import append_prompts, extend_trace

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15]]


def _prefill_and_step(backbone) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        trace, prefill_logits = append_prompts(backbone, None, PROMPTS, output="logits")
        ids = torch.full((2, 1), 21)
        _, step_logits = extend_trace(backbone, trace, torch.ones_like(ids), input_ids=ids, output="logits")
    return prefill_logits.float(), step_logits.float()


def test_bf16_on_cpu_switches_and_fp32_does_not(tiny_model_dir):
    assert load_backbone(str(tiny_model_dir), dtype="bfloat16", device="cpu").model.config._attn_implementation == NAME
    assert load_backbone(str(tiny_model_dir), dtype="float32", device="cpu").model.config._attn_implementation == "sdpa"


def test_single_query_attention_is_fp32_attention_and_blocks_are_unchanged(tiny_model_dir):
    fast = load_backbone(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    stock = load_backbone(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    stock.model.set_attn_implementation("sdpa")
    reference = load_backbone(str(tiny_model_dir), dtype="float32", device="cpu")
    fast_prefill, fast_step = _prefill_and_step(fast)
    stock_prefill, stock_step = _prefill_and_step(stock)
    reference_prefill, reference_step = _prefill_and_step(reference)
    assert torch.equal(fast_prefill, stock_prefill)  # multi-position blocks keep the bf16 kernel
    # the step differs from the bf16 kernel's only by its rounding, and is no further from the fp32 model's
    torch.testing.assert_close(fast_step, stock_step, rtol=0.05, atol=0.05)
    assert (fast_step - reference_step).abs().max() <= (stock_step - reference_step).abs().max() + 1e-2
