"""KV traces: the working memory latent methods hand to later agents, as a batched, left-padded KV cache.

A trace is a cache of `T` positions for `B` rows plus a `[B, T]` mask (1 = real position). Later agents' prompts
are left-padded blocks appended to it, so pad slots can sit inside a row; every forward therefore passes the full
mask and `position_ids = cumsum(mask) - 1` (see `positions_for_block`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Literal

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

if TYPE_CHECKING:
    from diffmas_eval.core.backbone import Backbone


class KVTrace:
    """A batched KV cache and its `[batch, length]` attention mask (1 = real position, 0 = pad slot).

    One handle owns a trace. Extending it (`extend_trace` and everything built on it) grows the cache in place and
    returns a new handle; the old one is consumed, and any later use of it raises (its mask would be shorter than
    the cache it reads). To keep the trace as it is, extend a `fork()` instead.
    """

    def __init__(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        self._cache = cache
        self._mask = mask
        self._consumed = False

    @property
    def cache(self) -> DynamicCache:
        self._check_live()
        return self._cache

    @property
    def mask(self) -> torch.Tensor:
        self._check_live()
        return self._mask

    def consume(self) -> tuple[DynamicCache, torch.Tensor]:
        """Hand this trace's cache and mask to an extension: from now on this handle raises on every use."""
        cache, mask = self.cache, self.mask
        self._consumed = True
        return cache, mask

    def _check_live(self) -> None:
        if self._consumed:
            raise RuntimeError("this KVTrace was consumed by extend_trace; fork() it first to keep a copy")

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
        A fork never inherits reserved room (`ReservableLayer`), so it cannot write into storage this trace reads;
        this trace may still write into its own room, beyond the positions the fork sees.
        """
        cache = copy.copy(self.cache)
        cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        for layer in cache.layers:
            if isinstance(layer, ReservableLayer):
                layer.release_room()
        return KVTrace(cache=cache, mask=self.mask)

    def select_rows(self, rows: torch.Tensor) -> KVTrace:
        """A fork holding only `rows` (in that order); used for the `other_doc` control and partial scoring batches."""
        forked = self.fork()
        forked.cache.batch_select_indices(rows.to(self.mask.device))
        return KVTrace(cache=forked.cache, mask=self.mask[rows])

    def reserve(self, upcoming: int) -> None:
        """Before a single-position extension: make sure there is room to write it in place.

        Args:
            upcoming: positions still to come in this loop (including the next one). Room grows by
                `min(upcoming, max(64, length // 8))`: a loop of G steps copies the cache about G / 64 + 8 ln(G)
                times instead of G times (a per-step `torch.cat` copies the whole cache, a cost that grows with
                trace length and batch; `benchmarks/bench_decode_step.py` measures it), holds at most
                `max(64, length // 8)` spare positions, and ends exact when the loop runs to its budget.

        No-op while autograd records (in-place writes would invalidate tensors saved for backward) and for layers
        that are not `ReservableLayer`s.
        """
        if upcoming <= 0 or torch.is_grad_enabled():
            return
        for layer in self.cache.layers:
            if isinstance(layer, ReservableLayer) and layer.room() == 0:
                layer.grow(min(upcoming, max(RESERVE_MIN, layer.get_seq_length() // RESERVE_FRACTION)))


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


RESERVE_MIN = 64
RESERVE_FRACTION = 8


class ReservableLayer(DynamicLayer):
    """A `DynamicLayer` that can reserve room for more positions and then write new ones in place.

    `keys`/`values` are always exactly the cached positions (views into the reserved storage when there is room), so
    everything that reads them (attention, masks, `get_seq_length`) behaves as for a `DynamicLayer`. Without room,
    or after any operation that rebinds the tensors (row selection, cropping, repetition), it falls back to
    `DynamicLayer.update` (`torch.cat`).
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._room_keys: torch.Tensor | None = None
        self._room_values: torch.Tensor | None = None

    def release_room(self) -> None:
        """Forget the reserved storage (the cached positions stay; the next update concatenates)."""
        self._room_keys = self._room_values = None

    def room(self) -> int:
        """Positions that can still be written in place."""
        return self._room_keys.shape[-2] - self.keys.shape[-2] if self._owns_room() else 0

    def grow(self, positions: int) -> None:
        """Reallocate with room for `positions` more positions than are cached (one copy of the cache)."""
        if not self.is_initialized or self.keys.numel() == 0:
            return
        length = self.keys.shape[-2]
        shape = (*self.keys.shape[:-2], length + positions, self.keys.shape[-1])
        self._room_keys = self.keys.new_empty(shape)
        self._room_values = self.values.new_empty(shape)
        self._room_keys[..., :length, :] = self.keys
        self._room_values[..., :length, :] = self.values
        self.keys = self._room_keys[..., :length, :]
        self.values = self._room_values[..., :length, :]

    def _owns_room(self) -> bool:
        room = self._room_keys
        return room is not None and self.keys.data_ptr() == room.data_ptr() and self.keys.shape[:-2] == room.shape[:-2]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions into the reserved room if it fits, else concatenate (`DynamicLayer.update`)."""
        if self.is_initialized and self._owns_room() and not torch.is_grad_enabled():
            length, new = self.keys.shape[-2], key_states.shape[-2]
            if length + new <= self._room_keys.shape[-2]:
                self._room_keys[..., length : length + new, :] = key_states
                self._room_values[..., length : length + new, :] = value_states
                self.keys = self._room_keys[..., : length + new, :]
                self.values = self._room_values[..., : length + new, :]
                return self.keys, self.values
        self.release_room()
        return super().update(key_states, value_states, *args, **kwargs)


def new_cache(backbone: Backbone) -> DynamicCache:
    """An empty cache for `backbone` whose full-attention layers can reserve room (`ReservableLayer`)."""
    cache = DynamicCache(config=backbone.causal_lm.config)
    cache.layers = [ReservableLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def extend_trace(
    backbone: Backbone,
    trace: KVTrace | None,
    block_mask: torch.Tensor,
    *,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    output: Literal["hidden", "logits"] = "hidden",
    adapter_names: list[str] | None = None,
) -> tuple[KVTrace, torch.Tensor]:
    """Run one block (token ids or embeddings) on top of `trace` and append it to the trace.

    Args:
        trace: the trace to extend (consumed: its cache is extended in place), or None to start one.
        block_mask: `[B, L]` mask of the block (left padding = 0).
        input_ids / inputs_embeds: `[B, L]` ids or `[B, L, D]` embeddings.
        output: "hidden" returns the last position's final hidden state `[B, D]` (no LM head is run);
            "logits" returns the last position's logits `[B, V]`.
        adapter_names: per row, the peft adapter it runs under (peft's mixed-adapter batch), or None. Only with
            output="logits": the "hidden" path calls the decoder body, which bypasses peft's forward.

    Returns:
        (extended trace, last-position output). The block's last column must be real for every row (left padding).
    """
    if adapter_names is not None and output != "logits":
        raise ValueError("adapter_names needs output='logits': the decoder body bypasses peft's mixed-adapter forward")
    cache, full_mask = _take_for_block(backbone, trace, block_mask)
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
        mixed = {} if adapter_names is None else {"adapter_names": list(adapter_names)}
        last = backbone.model(**kwargs, logits_to_keep=1, **mixed).logits[:, -1]
    return KVTrace(cache=cache, mask=full_mask), last


def _take_for_block(
    backbone: Backbone, trace: KVTrace | None, block_mask: torch.Tensor
) -> tuple[DynamicCache, torch.Tensor]:
    """The cache a block is appended to (`trace`'s, consumed here, or a new one) and its mask with the block."""
    if trace is None:
        return new_cache(backbone), block_mask
    cache, mask = trace.consume()
    return cache, torch.cat([mask, block_mask], dim=1)


def append_prompts(
    backbone: Backbone,
    trace: KVTrace | None,
    prompts: list[list[int]],
    output: Literal["hidden", "logits"] = "hidden",
    prompt_embeds: list[torch.Tensor] | None = None,
    adapter_names: list[str] | None = None,
) -> tuple[KVTrace, torch.Tensor]:
    """Left-pad `prompts` (one token list per row) and append them to `trace` (consumed); see `extend_trace`.

    On CPU, outside autograd, a batch whose prompts differ in length enough (`prefill_per_row`) is prefilled one row
    at a time and the rows' keys and values are assembled into the same left-padded block the batched forward
    would write: there the batched forward only adds the pad positions' work.
    """
    if prompt_embeds is not None and [len(e) for e in prompt_embeds] != [len(p) for p in prompts]:
        raise ValueError("prompt_embeds must hold one [len(prompt), D] tensor per row, as long as its prompt")
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise ValueError("adapter_names must name one adapter per row")
    if prefill_per_row(backbone, trace, prompts):
        return _append_per_row(backbone, trace, prompts, output, prompt_embeds, adapter_names)
    ids, mask = left_pad(prompts, backbone.pad_token_id, backbone.device)
    mixed = {"output": output, "adapter_names": adapter_names}
    if prompt_embeds is None:
        return extend_trace(backbone, trace, mask, input_ids=ids, **mixed)
    return extend_trace(backbone, trace, mask, inputs_embeds=left_pad_embeds(prompt_embeds, mask), **mixed)


def left_pad_embeds(rows: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Per-row embeddings `[L_r, D]` left-padded (with zeros, never read) into `[B, L, D]` matching `mask [B, L]`."""
    width = mask.shape[1]
    out = rows[0].new_zeros((len(rows), width, rows[0].shape[-1])).to(mask.device)
    for row, embeds in enumerate(rows):
        if len(embeds):
            out[row, width - len(embeds) :] = embeds.to(out.device)
    return out


# Per-row prefill when the padded block would be this much larger than its real tokens. A CPU prefill is compute-bound,
# so a batched block costs about its padded size; batching equal-length rows still gains about this much per row
# (`benchmarks/bench_prefill.py` measures both).
PER_ROW_PADDING_THRESHOLD = 0.15
PER_ROW_PREFILL_ON_CPU = True


def prefill_per_row(backbone: Backbone, trace: KVTrace | None, prompts: list[list[int]]) -> bool:
    """Whether `append_prompts` prefills row by row: CPU, no autograd, plain full-attention cache layers, and a
    padded block more than `PER_ROW_PADDING_THRESHOLD` larger than the real tokens."""
    if not PER_ROW_PREFILL_ON_CPU or len(prompts) < 2 or backbone.device.type != "cpu" or torch.is_grad_enabled():
        return False
    layers = new_cache(backbone).layers if trace is None else trace.cache.layers
    if any(type(layer) not in (DynamicLayer, ReservableLayer) for layer in layers):
        return False
    lengths = [len(prompt) for prompt in prompts]
    return min(lengths) > 0 and len(lengths) * max(lengths) > (1 + PER_ROW_PADDING_THRESHOLD) * sum(lengths)


def _compact_row(trace: KVTrace, row: int) -> KVTrace:
    """Row `row` of `trace` alone, its pad slots dropped: a batch-1 trace of that row's real positions (a copy)."""
    real = trace.mask[row].nonzero().squeeze(1)
    forked = trace.fork()
    for layer in forked.cache.layers:
        layer.keys = layer.keys[row : row + 1].index_select(-2, real)
        layer.values = layer.values[row : row + 1].index_select(-2, real)
    return KVTrace(cache=forked.cache, mask=trace.mask.new_ones((1, real.numel())))


def _append_per_row(
    backbone: Backbone,
    trace: KVTrace | None,
    prompts: list[list[int]],
    output: Literal["hidden", "logits"],
    prompt_embeds: list[torch.Tensor] | None = None,
    adapter_names: list[str] | None = None,
) -> tuple[KVTrace, torch.Tensor]:
    """`append_prompts` computed one row at a time (each row on its own real positions, no padding)."""
    _, block_mask = left_pad(prompts, backbone.pad_token_id, backbone.device)
    width = block_mask.shape[1]
    lasts: list[torch.Tensor] = []
    blocks: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: the block's keys and values, left-padded
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([prompt], dtype=torch.long, device=backbone.device)
        context = None if trace is None else _compact_row(trace, row)
        inputs = {"input_ids": ids} if prompt_embeds is None else {"inputs_embeds": prompt_embeds[row][None]}
        if adapter_names is not None:
            inputs["adapter_names"] = [adapter_names[row]]
        extended, last = extend_trace(backbone, context, torch.ones_like(ids), output=output, **inputs)
        lasts.append(last)
        for index, layer in enumerate(extended.cache.layers):
            if row == 0:
                blocks.append(
                    tuple(
                        t.new_zeros((len(prompts), t.shape[1], width, t.shape[-1])) for t in (layer.keys, layer.values)
                    )
                )
            for block, new in zip(blocks[index], (layer.keys, layer.values), strict=True):
                block[row, :, width - len(prompt) :] = new[0, :, -len(prompt) :]
    cache, full_mask = _take_for_block(backbone, trace, block_mask)
    for index, (keys, values) in enumerate(blocks):
        cache.update(keys, values, index)
    return KVTrace(cache=cache, mask=full_mask), torch.cat(lasts)
