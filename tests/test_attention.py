"""CPU attention: unmasked one-position queries of GQA models take the packed path and compute the same attention."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from diffmas_eval.core import attention
from diffmas_eval.core.attention import NAME, sdpa_packed_single_query
from diffmas_eval.core.backbone import load_backbone
from diffmas_eval.core.trace import append_prompts, extend_trace


class _Module(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("query_length", [1, 5])
def test_same_attention_as_transformers_sdpa(dtype, query_length):
    torch.manual_seed(0)
    query = torch.randn(2, 6, query_length, 16, dtype=dtype)
    key, value = torch.randn(2, 2, 9, 16, dtype=dtype), torch.randn(2, 2, 9, 16, dtype=dtype)
    ours, _ = sdpa_packed_single_query(_Module(), query, key, value, None, scaling=0.25)
    stock, _ = sdpa_attention_forward(_Module(), query, key, value, None, scaling=0.25)
    torch.testing.assert_close(ours.float(), stock.float(), rtol=2e-2, atol=2e-2)


def test_only_unmasked_16_bit_single_queries_get_a_mask(monkeypatch):
    seen = []
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda m, q, k, v, mask, **kw: seen.append(mask))
    key = value = torch.zeros(2, 2, 9, 16, dtype=torch.bfloat16)
    query = torch.zeros(2, 6, 1, 16, dtype=torch.bfloat16)
    sdpa_packed_single_query(_Module(), query, key, value, None)
    sdpa_packed_single_query(_Module(), torch.zeros(2, 6, 4, 16, dtype=torch.bfloat16), key, value, None)
    given = torch.zeros(2, 1, 1, 9, dtype=torch.bool)
    sdpa_packed_single_query(_Module(), query, key, value, given)
    sdpa_packed_single_query(_Module(), query.float(), key.float(), value.float(), None)
    assert seen[0].dtype == torch.bool and seen[0].shape == (2, 1, 1, 9) and bool(seen[0].all())
    assert seen[1] is None and seen[2] is given and seen[3] is None


def test_fp32_models_keep_sdpa(tiny_model_dir):
    assert load_backbone(str(tiny_model_dir), dtype="float32", device="cpu").model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_models_on_cpu_use_it_and_decode_the_same(tiny_model_dir, dtype):
    fast = load_backbone(str(tiny_model_dir), dtype=dtype, device="cpu")
    assert fast.model.config._attn_implementation == NAME
    stock = load_backbone(str(tiny_model_dir), dtype=dtype, device="cpu")
    stock.model.set_attn_implementation("sdpa")
    outputs = []
    for backbone in (fast, stock):
        with torch.no_grad():
            trace, prefill = append_prompts(backbone, None, [[5, 6, 7, 8, 9]], output="logits")  # batch 1: no mask
            ids = torch.full((1, 1), 21)
            _, step = extend_trace(backbone, trace, torch.ones_like(ids), input_ids=ids, output="logits")
        outputs.append((prefill.float(), step.float()))
    (fast_prefill, fast_step), (stock_prefill, stock_step) = outputs
    assert torch.equal(fast_prefill, stock_prefill)  # multi-position blocks are untouched
    torch.testing.assert_close(fast_step, stock_step, rtol=5e-2, atol=5e-2)
