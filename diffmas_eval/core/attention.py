"""Attention for 16-bit models on CPU: unmasked one-position queries of GQA models take transformers' packed path.

transformers' `sdpa` attention passes `enable_gqa=True` to `scaled_dot_product_attention` when there is no attention
mask (a batch without padding, e.g. batch size 1), and otherwise, for a single query position, packs the query heads
that share a key/value head into the query-length axis. On CPU the `enable_gqa` kernel is far slower for one query
position in bfloat16. Measured with the default model's shapes (9 query heads, 3 KV heads x 64, 341-473 cached
positions, 1 thread; `benchmarks/bench_decode_step.py` prints it): batch 8, 5-9 ms vs 0.7-0.8 ms packed; batch 1,
0.8-1.1 ms vs 0.3 ms. So a bf16 decode step of an unpadded batch spent a large share of its time in attention.
Giving those calls an all-true mask makes transformers take the packed path; the result is the same attention.
float32 (no clear difference measured), multi-position blocks (prefills, training sequences: `enable_gqa` is as fast
or faster there) and other devices are left alone.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "diffmas_sdpa"
HALF_DTYPES = (torch.bfloat16, torch.float16)


def sdpa_packed_single_query(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention; on CPU a 16-bit one-position query of a GQA model without a mask gets an
    all-true mask, so the query heads are packed instead of using the slow `enable_gqa` kernel."""
    if (
        attention_mask is None
        and query.shape[2] == 1
        and query.device.type == "cpu"
        and query.dtype in HALF_DTYPES
        and getattr(module, "num_key_value_groups", 1) > 1
    ):
        attention_mask = torch.ones((query.shape[0], 1, 1, key.shape[2]), dtype=torch.bool, device=query.device)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(NAME, sdpa_packed_single_query)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use_fast_cpu_attention(model: Any) -> bool:
    """Switch a 16-bit model on CPU from `sdpa` to `sdpa_packed_single_query`; returns whether it switched."""
    parameter = next(model.parameters())
    if (
        getattr(model.config, "_attn_implementation", None) == "sdpa"
        and parameter.device.type == "cpu"
        and parameter.dtype in HALF_DTYPES
    ):
        model.set_attn_implementation(NAME)
        return True
    return False
