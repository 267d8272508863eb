"""Attention for 16-bit models on CPU: single-position queries (decode and latent steps) run SDPA in float32.

PyTorch's CPU flash-attention kernel is far slower in bfloat16 than in float32 for one query position. Measured with
the default model's shapes (9 query heads, 3 KV heads x 64, 700 cached positions, 1 thread): batch 8 takes 11.1 ms
in bf16 against 2.4 ms in fp32 (batch 1: 2.0 ms against 0.1 ms), so attention was 75% of a bf16 batch-8 decode step.
Upcasting q, k and v for those calls costs one conversion of the cached keys and values, and computes what fp32
attention over the bf16 inputs computes (at least as accurate as the bf16 kernel). Multi-position blocks (prompt
prefills, training sequences) keep the 16-bit kernel, which is fast there. On other devices nothing changes.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "diffmas_sdpa"
HALF_DTYPES = (torch.bfloat16, torch.float16)


def sdpa_single_query_fp32(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with one-position queries of 16-bit CPU tensors computed in float32."""
    if query.shape[2] != 1 or query.device.type != "cpu" or query.dtype not in HALF_DTYPES:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    output, weights = sdpa_attention_forward(
        module, query.float(), key.float(), value.float(), attention_mask, **kwargs
    )
    return output.to(query.dtype), weights


AttentionInterface.register(NAME, sdpa_single_query_fp32)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use_fast_cpu_attention(model: Any) -> bool:
    """Switch a 16-bit model on CPU from `sdpa` to `sdpa_single_query_fp32`; returns whether it switched."""
    parameter = next(model.parameters())
    if (
        getattr(model.config, "_attn_implementation", None) == "sdpa"
        and parameter.device.type == "cpu"
        and parameter.dtype in HALF_DTYPES
    ):
        model.set_attn_implementation(NAME)
        return True
    return False
