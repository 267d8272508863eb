"""KV traces: the working memory latent methods hand to later agents, as a batched, left-padded KV cache.

A trace is a cache of `T` positions for `B` rows plus a `[B, T]` mask (1 = real position). Later agents' prompts
are left-padded blocks appended to it, so pad slots can sit inside a row; every forward therefore passes the full
mask and `position_ids = cumsum(mask) - 1` (see `positions_for_block`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from transformers import DynamicCache

if TYPE_CHECKING:
    from diffmas_eval.core.backbone import Backbone


@dataclass
class KVTrace:
    """A batched KV cache and its `[batch, length]` attention mask (1 = real position, 0 = pad slot)."""

    cache: DynamicCache
    mask: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def real_lengths(self) -> list[int]:
        """Real (non-pad) positions per row."""
        return [int(n) for n in self.mask.sum(dim=1)]

    def fork(self) -> KVTrace:
        """A trace sharing this one's tensors that can be extended without touching this one.

        `DynamicLayer.update` rebinds its tensors (`torch.cat`) instead of writing into them, so copying the layer
        objects (not the tensors) is enough: extending the fork leaves this trace's keys and values as they were.
        """
        cache = copy.copy(self.cache)
        cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        return KVTrace(cache=cache, mask=self.mask)

    def select_rows(self, rows: torch.Tensor) -> KVTrace:
        """A fork holding only `rows` (in that order); used for the `other_doc` control."""
        forked = self.fork()
        forked.cache.batch_select_indices(rows.to(self.mask.device))
        return KVTrace(cache=forked.cache, mask=self.mask[rows])


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into `ids [B, L]` and `mask [B, L]` (1 = real token)."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def positions_for_block(full_mask: torch.Tensor, block_length: int) -> torch.Tensor:
    """Position ids `[B, block_length]` of the last `block_length` columns: `cumsum(mask) - 1` (pads clamp to 0)."""
    return (full_mask.cumsum(dim=1) - 1).clamp(min=0)[:, -block_length:]


def new_cache(backbone: Backbone) -> DynamicCache:
    return DynamicCache(config=backbone.causal_lm.config)


def extend_trace(
    backbone: Backbone,
    trace: KVTrace | None,
    block_mask: torch.Tensor,
    *,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    output: Literal["hidden", "logits"] = "hidden",
) -> tuple[KVTrace, torch.Tensor]:
    """Run one block (token ids or embeddings) on top of `trace` and append it to the trace.

    Args:
        trace: the trace to extend (its cache is extended in place), or None to start one.
        block_mask: `[B, L]` mask of the block (left padding = 0).
        input_ids / inputs_embeds: `[B, L]` ids or `[B, L, D]` embeddings.
        output: "hidden" returns the last position's final hidden state `[B, D]` (no LM head is run);
            "logits" returns the last position's logits `[B, V]`.

    Returns:
        (extended trace, last-position output). The block's last column must be real for every row (left padding).
    """
    cache = new_cache(backbone) if trace is None else trace.cache
    full_mask = block_mask if trace is None else torch.cat([trace.mask, block_mask], dim=1)
    block_length = block_mask.shape[1]
    kwargs = {
        "input_ids": input_ids,
        "inputs_embeds": inputs_embeds,
        "attention_mask": full_mask,
        "position_ids": positions_for_block(full_mask, block_length),
        "past_key_values": cache,
        "use_cache": True,
    }
    if output == "hidden":
        last = backbone.decoder(**kwargs).last_hidden_state[:, -1]
    else:
        last = backbone.model(**kwargs, logits_to_keep=1).logits[:, -1]
    return KVTrace(cache=cache, mask=full_mask), last


def append_prompts(
    backbone: Backbone,
    trace: KVTrace | None,
    prompts: list[list[int]],
    output: Literal["hidden", "logits"] = "hidden",
) -> tuple[KVTrace, torch.Tensor]:
    """Left-pad `prompts` (one token list per row) and append them to `trace`; see `extend_trace`."""
    ids, mask = left_pad(prompts, backbone.pad_token_id, backbone.device)
    return extend_trace(backbone, trace, mask, input_ids=ids, output=output)
