"""Attention on CPU: one-position queries (decode and latent steps) of GQA models take transformers' packed path.

transformers' `sdpa` attention passes `enable_gqa=True` to `scaled_dot_product_attention` when there is no attention
mask (a batch without padding, e.g. batch size 1), and otherwise, for a single query position, packs the query heads
that share a key/value head into the query-length axis. On CPU the `enable_gqa` kernel is far slower for one query
position, worst in bfloat16. Measured with the default model's shapes (9 query heads, 3 KV heads x 64, 473 cached
positions, 1 thread, `benchmarks/bench_decode_step.py` prints it): batch 8, bf16 7.0 ms vs 0.57 ms packed; fp32 1.2
vs 0.6 ms. So a bf16 decode step of an unpadded batch spent most of its time in attention. Giving those calls an
all-true mask makes transformers take the packed path; the result is the same attention. Multi-position blocks
(prefills, training sequences), where `enable_gqa` is as fast or faster, and other devices are left alone.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "diffmas_sdpa"


def sdpa_packed_single_query(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention; on CPU a one-position query of a GQA model without a mask gets an all-true
    mask, so the query heads are packed instead of using the slow `enable_gqa` kernel."""
    if (
        attention_mask is None
        and query.shape[2] == 1
        and query.device.type == "cpu"
        and getattr(module, "num_key_value_groups", 1) > 1
    ):
        attention_mask = torch.ones((query.shape[0], 1, 1, key.shape[2]), dtype=torch.bool, device=query.device)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(NAME, sdpa_packed_single_query)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use_fast_cpu_attention(model: Any) -> bool:
    """Switch a model on CPU from `sdpa` to `sdpa_packed_single_query`; returns whether it switched."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa" and next(model.parameters()).device.type == "cpu":
        model.set_attn_implementation(NAME)
        return True
    return False
