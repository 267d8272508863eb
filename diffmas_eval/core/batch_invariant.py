"""Batch-invariant inference: every row of a batch is computed exactly as it would be alone (the `batch_invariant`
model arg), so greedy outputs and log-likelihoods do not depend on the batch size or on which documents share a batch.

Why rows change with their batch: a kernel's rounding depends on how it splits its work, and the split can depend on
the whole batch. On CPU a matrix kernel picks its blocking from the number of rows, attention over a left-padded
batch reduces over masked positions that shift where each row's real keys fall, and a reduction split across threads
depends on how many outputs there are. In fp32 the differences rarely change an argmax; in bf16 they do.

How, as Thinking Machines' `batch_invariant_ops` and vLLM's batch-invariant mode do it: while a batch-invariant model
runs a forward, `torch.library` replaces the kernels of every op class whose rounding can depend on other rows, and
nothing in the model code changes. On CPU:
- **Matrix products** (`aten::linear`, `mm`, `addmm`, `bmm`). Rows of one sequence (one row's real tokens in the
  forward's block, read from its 2D attention mask) are multiplied in one call of their own, whatever else is in the
  batch; rows standing alone (decode and latent steps, a kept last position, anything outside a known block) are
  multiplied in fixed tiles of `ROW_TILE` rows, zero-padded, so every tile is the same problem whatever the batch.
  Pad positions get zeros (they are never read). Weights are packed once for oneDNN, as `core/linear.py` does.
- **Attention** (`aten::scaled_dot_product_attention`). Each row attends alone, on its real queries and the keys its
  mask allows, compacted (no masked position is passed to the kernel), with a GQA model's query heads packed per KV
  head; the call therefore has the same shapes and inputs at any batch size and padding.
- **Reductions** (mean, sum, norms, softmax, log-softmax) and everything else run on one intra-op thread inside the
  mode: PyTorch's serial CPU kernels reduce each output with one loop whose order depends only on the reduced
  length, and compute each element of a pointwise op from its own inputs; only their multi-threaded schedules depend
  on tensor sizes.
- **Anything else.** At load, one probe forward (a padded prefill and a cached step) lists every op the backbone
  calls; an op outside these classes (a float cumulative sum, a scatter-add of MoE experts, ...) is refused with an
  error naming it, so a new architecture cannot vary silently.
The model must use SDPA attention (eager attention reduces over padded key positions in a matrix product).

Only inference is affected: forwards recorded by autograd (training) run the stock kernels.

On CUDA the matrix products and reductions are Thinking Machines' Triton kernels (`pip install
git+https://github.com/thinking-machines-lab/batch_invariant_ops`: their `mm`, `addmm`, `log_softmax`, `mean`
overrides), entered around each forward the same way, and attention runs row by row as on CPU through PyTorch's
math kernel. That path is not tested here (no GPU).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffmas_eval.core.linear import pack_linear_weight, packed_linear, packed_linear_available

# Rows standing alone are multiplied in tiles of this many rows: a batch of up to 8 decode steps is one call.
ROW_TILE = 8
_NONE = torch.empty(0, dtype=torch.long)


@dataclass
class BlockPlan:
    """How the rows of one forward's block `[B, L]` group into sequences.

    Attributes:
        shape: (B, L) of the block (inputs of other leading shapes are treated as rows standing alone).
        segments: flat row ranges `(start, end)` of each sequence with two or more real tokens, in the flattened
            `[B * L]` rows (one row's real tokens are contiguous: left or right padding).
        singles: flat indices of the rows of sequences with exactly one real token.
        padded: whether some rows of the block are padding.
    """

    shape: tuple[int, int]
    segments: list[tuple[int, int]]
    singles: torch.Tensor
    padded: bool

    @classmethod
    def from_block_mask(cls, block_mask: torch.Tensor) -> BlockPlan:
        """Plan for a `[B, L]` mask of the block's positions (1 = real token)."""
        batch, length = block_mask.shape
        real = block_mask.to(device="cpu", dtype=torch.bool)
        if bool(real.all()):  # no padding: each row is one sequence of the block's length
            if length == 1:
                return cls((batch, 1), [], torch.arange(batch), padded=False)
            return cls((batch, length), [(row * length, row * length + length) for row in range(batch)], _NONE, False)
        counts = real.sum(dim=1).tolist()
        segments: list[tuple[int, int]] = []
        singles: list[int] = []
        for row, count in enumerate(counts):
            if count == 0:
                continue
            positions = real[row].nonzero().squeeze(1)
            first, last = int(positions[0]), int(positions[-1])
            if last - first + 1 != count:
                raise NotImplementedError(
                    "batch_invariant: a row of the block has pad positions between its real tokens; only left or "
                    "right padding is supported"
                )
            start = row * length + first
            if count == 1:
                singles.append(start)
            else:
                segments.append((start, start + count))
        return cls(
            shape=(batch, length),
            segments=segments,
            singles=torch.tensor(singles, dtype=torch.long),
            padded=sum(counts) < batch * length,
        )


class _ModeState:
    """What the substituted kernels read while `batch_invariant_kernels` is entered: the current block plan, nesting,
    whether weights are packed, and per-process caches (zero tiles, per-mask attention plans)."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_forward = False
        self.plan: BlockPlan | None = None
        self.warned = False
        self.packing = False  # whether the current model's linears use oneDNN-packed weights
        self.zero_tiles: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
        self.attention_plans: dict[tuple[int, int, int, bool], tuple[Any, list[Any]]] = {}


_STATE = _ModeState()


# --- matrix products -------------------------------------------------------------------------------------------


def _packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight [N, K]` packed for oneDNN (cached on the weight, rebuilt when it is replaced or changed in place), or
    the weight itself when this PyTorch build or this CPU cannot pack its dtype (`core/linear.py`)."""
    if not _STATE.packing or not weight.is_contiguous() or not packed_linear_available(weight.dtype):
        return weight
    key = (weight.data_ptr(), weight._version, weight.dtype)
    cached = getattr(weight, "_diffmas_invariant_packed", None)
    if cached is None or cached[0] != key:
        cached = (key, pack_linear_weight(weight))
        weight._diffmas_invariant_packed = cached
    return cached[1]


def _multiply_rows(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`rows [M, K] @ weight[N, K]^T + bias` in one kernel call (oneDNN with a packed weight when available)."""
    packed = _packed_weight(weight)
    if packed is not weight:
        return packed_linear(rows, packed, bias)
    out = rows.new_empty(rows.shape[0], weight.shape[0])
    if bias is None:
        return torch.mm(rows, weight.t(), out=out)  # the `.out` overload keeps the stock kernel
    return torch.addmm(bias, rows, weight.t(), out=out)


def _multiply_in_tiles(rows: torch.Tensor, multiply: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`multiply` applied to `rows [M, K]` in tiles of exactly `ROW_TILE` rows (the last one zero-padded), so each
    row's result never depends on how many rows there are or which rows are its neighbours."""
    count = rows.shape[0]
    if count == ROW_TILE:
        return multiply(rows)
    outputs = [multiply(rows[start : start + ROW_TILE]) for start in range(0, count - count % ROW_TILE, ROW_TILE)]
    if count % ROW_TILE or count == 0:
        tail = _zero_tile(rows)
        tail[: count % ROW_TILE] = rows[count - count % ROW_TILE :]
        outputs.append(multiply(tail)[: count % ROW_TILE])
        tail[: count % ROW_TILE] = 0
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def _zero_tile(rows: torch.Tensor) -> torch.Tensor:
    """A reusable `[ROW_TILE, K]` tile of zeros for `rows`' width, dtype and device (callers zero what they wrote)."""
    key = (rows.shape[1], rows.dtype, rows.device)
    tile = _STATE.zero_tiles.get(key)
    if tile is None:
        tile = _STATE.zero_tiles[key] = rows.new_zeros(ROW_TILE, rows.shape[1])
    return tile


def invariant_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`aten::linear` with each row's result independent of the other rows: `input [..., K]` -> `[..., N]`.

    Inside a forward's block `[B, L]` each sequence's real rows are one call and single-token rows share fixed
    tiles; pad rows get zeros. Any other input is treated as rows standing alone (tiles).
    """
    rows = input.reshape(-1, input.shape[-1]).contiguous()
    out_shape = (*input.shape[:-1], weight.shape[0])
    plan = _STATE.plan
    if plan is None or tuple(input.shape[:-1]) != plan.shape or plan.singles.numel() == rows.shape[0]:
        return _multiply_in_tiles(rows, lambda tile: _multiply_rows(tile, weight, bias)).reshape(out_shape)
    out = (
        rows.new_zeros(rows.shape[0], weight.shape[0])
        if plan.padded
        else rows.new_empty(rows.shape[0], weight.shape[0])
    )
    for start, end in plan.segments:
        out[start:end] = _multiply_rows(rows[start:end], weight, bias)
    if plan.singles.numel():
        out[plan.singles] = _multiply_in_tiles(rows[plan.singles], lambda tile: _multiply_rows(tile, weight, bias))
    return out.reshape(out_shape)


def invariant_mm(input: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
    """`aten::mm`, each row of `input [M, K]` multiplied in fixed tiles: `[M, N]`."""
    return _multiply_in_tiles(input.contiguous(), lambda tile: torch.mm(tile, mat2, out=tile.new_empty(0)))


def invariant_addmm(
    input: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, *, beta: float = 1, alpha: float = 1
) -> torch.Tensor:
    """`aten::addmm` (`beta * input + alpha * mat1 @ mat2`), each row of `mat1` multiplied in fixed tiles."""
    if input.dim() == 2 and input.shape[0] != 1:  # a bias per row: added after the product
        return input * beta + invariant_mm(mat1, mat2) * alpha
    return _multiply_in_tiles(
        mat1.contiguous(),
        lambda tile: torch.addmm(input, tile, mat2, beta=beta, alpha=alpha, out=tile.new_empty(0)),
    )


def invariant_bmm(input: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
    """`aten::bmm`: each matrix of the batch multiplied alone, its rows in fixed tiles: `[B, M, N]`."""
    return torch.stack([invariant_mm(a, b) for a, b in zip(input, mat2, strict=True)])


# --- attention ---------------------------------------------------------------------------------------------------


def _allowed_keys(attn_mask: torch.Tensor | None, is_causal: bool, batch: int, queries: int, keys: int) -> torch.Tensor:
    """Boolean `[B or 1, Q, T]`: which keys each query may attend to."""
    if attn_mask is not None and is_causal:
        raise ValueError("scaled_dot_product_attention takes an attention mask or is_causal, not both")
    if attn_mask is None:
        if is_causal:  # PyTorch's `is_causal`: query i sees keys 0..i
            return torch.ones(queries, keys, dtype=torch.bool).tril()[None]
        return torch.ones(1, queries, keys, dtype=torch.bool)
    if attn_mask.dtype != torch.bool:
        raise NotImplementedError(
            "batch_invariant: attention with an additive float mask is not supported (transformers' SDPA "
            "attention passes a boolean mask)"
        )
    if attn_mask.dim() != 4 or attn_mask.shape[1] != 1:
        raise NotImplementedError("batch_invariant: attention masks must be [batch, 1, queries, keys]")
    return attn_mask[:, 0].expand(attn_mask.shape[0], queries, keys).to("cpu")


def _selection(chosen: torch.Tensor) -> slice | torch.Tensor:
    """Indices of the True entries of a boolean vector: a slice when they are contiguous (a view, no copy)."""
    index = chosen.nonzero().squeeze(1)
    if index.numel() and int(index[-1]) - int(index[0]) + 1 == index.numel():
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


@dataclass
class _RowAttention:
    """One row's share of an attention call: which queries are real, which keys they may see, and the mask of the
    compacted row (None when it allows everything)."""

    queries: slice | torch.Tensor
    keys: slice | torch.Tensor
    allowed: torch.Tensor | None
    _masks: dict[tuple[torch.dtype, torch.device, int], torch.Tensor] | None = None

    def mask(self, dtype: torch.dtype, device: torch.device, groups: int) -> torch.Tensor | None:
        """The additive mask `[1, 1, groups * Q', T']` for the kernel (query heads packed in `groups`)."""
        if self.allowed is None:
            return None
        self._masks = self._masks or {}
        key = (dtype, device, groups)
        if key not in self._masks:
            additive = torch.zeros(self.allowed.shape, dtype=dtype).masked_fill_(~self.allowed, float("-inf"))
            self._masks[key] = additive.repeat(groups, 1)[None, None].to(device)
        return self._masks[key]


def _row_attention_plans(
    attn_mask: torch.Tensor | None, is_causal: bool, batch: int, queries: int, keys: int
) -> list[_RowAttention]:
    """Per row: its real queries, the keys they may see, and the compacted mask. A query is real when it may see its
    own position (the last `Q` keys are the block's own positions); pad queries see nothing of theirs and get zero
    outputs. Computed once per mask (every layer of a forward passes the same one)."""
    key = (id(attn_mask), queries, keys, is_causal)
    cached = _STATE.attention_plans.get(key)
    if cached is not None and cached[0] is attn_mask:
        return cached[1]
    allowed = _allowed_keys(attn_mask, is_causal, batch, queries, keys)
    own = torch.arange(queries)
    plans = []
    for row in range(batch):
        row_allowed = allowed[row if allowed.shape[0] > 1 else 0]
        query_selection = _selection(row_allowed[own, keys - queries + own])
        row_allowed = row_allowed[query_selection]
        key_selection = _selection(row_allowed.any(dim=0))
        row_allowed = row_allowed[:, key_selection]
        plans.append(_RowAttention(query_selection, key_selection, None if bool(row_allowed.all()) else row_allowed))
    _STATE.attention_plans[key] = (attn_mask, plans)
    return plans


def _attend_one_row(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    """One row's attention `[1, Hq, Q, D]` over its compacted keys `[1, Hkv, T, D]`, the query heads that share a
    KV head packed into the query axis (the kernel needs equal head counts; `mask` is already packed)."""
    heads, queries = query.shape[1], query.shape[2]
    packed = query.reshape(1, key.shape[1], heads // key.shape[1] * queries, query.shape[-1])
    if query.device.type == "cpu":
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            packed, key, value, 0.0, False, attn_mask=mask, scale=scale
        )[0]
    else:
        out = torch.ops.aten._scaled_dot_product_attention_math(packed, key, value, mask, 0.0, False, scale=scale)[0]
    return out.reshape(1, heads, queries, value.shape[-1])


def invariant_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """`aten::scaled_dot_product_attention` computed row by row on each row's real queries and allowed keys only.

    Shapes: query `[B, Hq, Q, D]`, key/value `[B, Hkv, T, D]` (Hq a multiple of Hkv; GQA with or without
    `enable_gqa`), mask boolean `[B or 1, 1, Q, T]` or None. Returns `[B, Hq, Q, Dv]`, zeros at pad queries.
    """
    if dropout_p:
        raise NotImplementedError("batch_invariant: attention dropout is not supported (inference only)")
    batch, heads, queries, _ = query.shape
    if heads % key.shape[1]:
        raise NotImplementedError("batch_invariant: query heads must be a multiple of key/value heads")
    plans = _row_attention_plans(attn_mask, is_causal, batch, queries, key.shape[2])
    out = query.new_zeros(batch, heads, queries, value.shape[-1])
    groups = heads // key.shape[1]
    for row, plan in enumerate(plans):
        q = query[row : row + 1, :, plan.queries]
        if q.shape[2] == 0:
            continue
        k, v = key[row : row + 1, :, plan.keys], value[row : row + 1, :, plan.keys]
        mask = plan.mask(query.dtype, query.device, groups)
        out[row, :, plan.queries] = _attend_one_row(q.contiguous(), k, v, mask, scale)[0]
    return out


# --- the mode ----------------------------------------------------------------------------------------------------

_CPU_KERNELS: dict[str, Callable[..., Any]] = {
    "linear": invariant_linear,
    "mm": invariant_mm,
    "addmm": invariant_addmm,
    "bmm": invariant_bmm,
    "scaled_dot_product_attention": invariant_attention,
}


def _cuda_matmul_library() -> Any:
    """Thinking Machines' `batch_invariant_ops` (CUDA matmul and reduction kernels), or a clear error."""
    try:
        import batch_invariant_ops
    except ImportError as err:
        raise ImportError(
            "batch_invariant on CUDA needs Thinking Machines' kernels: pip install "
            "git+https://github.com/thinking-machines-lab/batch_invariant_ops (or run on CPU, or drop batch_invariant)"
        ) from err
    return batch_invariant_ops


def _register(library: torch.library.Library, kernels: dict[str, Callable[..., Any]], dispatch_key: str) -> None:
    """`library.impl` for every kernel, without PyTorch's one-time warning that a kernel is overridden (overriding is
    the point). Only the process's first override warns, so only then are warnings caught: entering
    `catch_warnings` on every forward would reset Python's once-only warning registry and repeat other warnings."""
    if _STATE.warned:
        for name, kernel in kernels.items():
            library.impl(name, kernel, dispatch_key)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Warning only once for all operators")
        for name, kernel in kernels.items():
            library.impl(name, kernel, dispatch_key)
    _STATE.warned = True


@contextlib.contextmanager
def batch_invariant_kernels(
    plan: BlockPlan | None = None, device_type: str = "cpu", pack_weights: bool = True
) -> Iterator[None]:
    """Inside: the substituted kernels (see the module docstring) for `device_type`, one intra-op thread on CPU, and
    `plan` as the block whose sequences the matrix products keep together (None: every row stands alone).
    `pack_weights`: CPU linears multiply oneDNN-packed weights (when the build has oneDNN), else PyTorch's `mm`.

    Reentrant: a nested entry keeps the outer kernels, and the outer block unless it gives its own."""
    if _STATE.depth:  # nested: the outer kernels stay; a forward's block replaces the plan while it runs
        outer = _STATE.plan
        _STATE.depth += 1
        _STATE.plan = outer if plan is None else plan
        try:
            yield
        finally:
            _STATE.depth -= 1
            _STATE.plan = outer
        return
    library = torch.library.Library("aten", "IMPL")
    cuda_mode: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    threads = torch.get_num_threads()
    if device_type == "cpu":
        _register(library, _CPU_KERNELS, "CPU")
    else:
        cuda_mode = _cuda_matmul_library().set_batch_invariant_mode(True)
        _register(library, {"scaled_dot_product_attention": invariant_attention}, "CUDA")
    _STATE.depth, _STATE.plan = 1, plan
    _STATE.packing = pack_weights and packed_linear_available()
    if device_type == "cpu" and threads > 1:
        torch.set_num_threads(1)
    try:
        with cuda_mode:
            yield
    finally:
        _STATE.depth, _STATE.plan = 0, None
        _STATE.attention_plans.clear()
        library._destroy()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _block_plan(arguments: dict[str, Any]) -> BlockPlan | None:
    """The block plan of a forward from its arguments (`input_ids` or `inputs_embeds`, 2D `attention_mask`)."""
    extra = arguments.get("kwargs", {})
    inputs = next(
        (
            value
            for name in ("input_ids", "inputs_embeds")
            for value in (arguments.get(name), extra.get(name))
            if value is not None
        ),
        None,
    )
    if inputs is None:
        return None
    mask = arguments.get("attention_mask", extra.get("attention_mask"))
    batch, length = inputs.shape[0], inputs.shape[1]
    if mask is None:
        return BlockPlan.from_block_mask(torch.ones(batch, length, dtype=torch.bool))
    if mask.dim() != 2:
        raise NotImplementedError("batch_invariant needs the 2D [batch, positions] attention mask in forwards")
    return BlockPlan.from_block_mask(mask[:, -length:])


@functools.cache
def _invariant_class(cls: type) -> type:
    """A subclass of a model class whose inference forwards run inside `batch_invariant_kernels` (same name, so
    nothing that records class names sees a difference). A class swap, not a patched attribute: peft calls
    `model.forward` directly, and copies of the module keep the behaviour."""
    signature = inspect.signature(cls.forward)

    def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() or _STATE.in_forward:  # training, or the decoder inside the causal LM
            return super(subclass, self).forward(*args, **kwargs)
        arguments = signature.bind_partial(self, *args, **kwargs).arguments
        device_type = next(self.parameters()).device.type
        with batch_invariant_kernels(_block_plan(arguments), device_type, self._diffmas_pack_weights):
            _STATE.in_forward = True
            try:
                return super(subclass, self).forward(*args, **kwargs)
            finally:
                _STATE.in_forward = False

    namespace = {"forward": forward, "__qualname__": cls.__qualname__, "__module__": cls.__module__}
    subclass = type(cls.__name__, (cls,), {**namespace, "_diffmas_batch_invariant": True})
    return subclass


def make_batch_invariant(model: torch.nn.Module, decoder: torch.nn.Module, pack_weights: bool = True) -> None:
    """Make `model` (a causal LM) and its `decoder` body run every inference forward in the batch-invariant mode,
    after checking that the mode covers every op they call (`check_kernel_coverage`). `pack_weights`: the mode's CPU
    linears multiply oneDNN-packed weights (one more copy of them in memory), else PyTorch's `mm`.

    Raises:
        NotImplementedError: the model cannot use SDPA attention, or calls an op the mode does not cover.
        ImportError: on CUDA without Thinking Machines' `batch_invariant_ops`.
    """
    device_type = next(model.parameters()).device.type
    if device_type not in ("cpu", "cuda"):
        raise NotImplementedError(f"batch_invariant supports CPU and CUDA, not {device_type}")
    if device_type == "cuda":
        _cuda_matmul_library()
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        try:
            model.set_attn_implementation("sdpa")
        except (ValueError, ImportError) as err:
            raise NotImplementedError(
                f"batch_invariant needs SDPA attention, which {type(model).__name__} does not support: {err}"
            ) from err
    for module in (model, decoder):
        if not getattr(module, "_diffmas_batch_invariant", False):
            module.__class__ = _invariant_class(type(module))
        module._diffmas_pack_weights = pack_weights
    check_kernel_coverage(model)


def kernels_for(model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
    """The batch-invariant kernels, every row standing alone, when `model` runs in the mode and autograd is off (for
    computations between its forwards, e.g. the latent aligner or a method's own modules); otherwise nothing."""
    if torch.is_grad_enabled() or not is_batch_invariant(model):
        return contextlib.nullcontext()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return batch_invariant_kernels(None, next(model.parameters()).device.type, base._diffmas_pack_weights)


def is_batch_invariant(model: torch.nn.Module) -> bool:
    """Whether `model` (or the causal LM under a peft wrapper) runs its forwards in the batch-invariant mode."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "_diffmas_batch_invariant", False)


# --- coverage ----------------------------------------------------------------------------------------------------

# Ops that copy, select or create values without arithmetic on floating-point inputs.
DATA_MOVEMENT_OPS = frozenset(
    {
        "_to_copy",
        "_unsafe_view",
        "alias",
        "arange",
        "cat",
        "clone",
        "contiguous",
        "copy_",
        "detach",
        "detach_",
        "embedding",
        "empty",
        "empty_like",
        "expand",
        "fill_",
        "flatten",
        "full",
        "full_like",
        "gather",
        "index",
        "index_select",
        "is_nonzero",
        "item",
        "_local_scalar_dense",
        "lift_fresh",
        "masked_fill",
        "masked_fill_",
        "narrow",
        "new_empty",
        "new_full",
        "new_ones",
        "new_zeros",
        "nonzero",
        "ones",
        "ones_like",
        "permute",
        "repeat",
        "reshape",
        "select",
        "slice",
        "split",
        "split_with_sizes",
        "squeeze",
        "stack",
        "t",
        "to",
        "transpose",
        "unbind",
        "unsqueeze",
        "view",
        "zero_",
        "zeros",
        "zeros_like",
    }
)
# Reductions whose serial CPU kernel reduces each output with one loop over the reduced elements (see the module
# docstring); the mode runs them on one thread.
SERIAL_REDUCTION_OPS = frozenset(
    {"mean", "sum", "_softmax", "softmax", "_log_softmax", "log_softmax", "linalg_vector_norm", "norm"}
)
# Reductions whose result does not depend on the order of the reduced elements.
ORDER_FREE_REDUCTION_OPS = frozenset({"amax", "amin", "max", "min", "argmax", "argmin"})
# Ops with a batch-invariant kernel per device: ours on CPU; on CUDA Thinking Machines' (`linear` decomposes into
# their `mm` / `addmm`) and our attention.
COVERED_OPS = {
    "cpu": frozenset(_CPU_KERNELS) | SERIAL_REDUCTION_OPS,
    "cuda": frozenset({"scaled_dot_product_attention", "linear", "mm", "addmm", "mean", "_log_softmax", "log_softmax"}),
}


def uncovered_op(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], device_type: str = "cpu") -> bool:
    """Whether the batch-invariant mode has no account of this call on `device_type`: no batch-invariant kernel, not
    data movement, not pointwise, not an order-free reduction, and floating-point tensors among its inputs."""
    name = func._schema.name.split("::", 1)[1]
    if name in COVERED_OPS[device_type] or name in DATA_MOVEMENT_OPS or name in ORDER_FREE_REDUCTION_OPS:
        return False
    if torch.Tag.pointwise in func.tags:
        return False
    if name == "matmul":  # decomposes into mm (a matrix operand) or, on CPU, bmm
        operands = [a for a in args[:2] if isinstance(a, torch.Tensor)]
        return not (
            len(operands) == 2
            and operands[0].dim() >= 2
            and (operands[1].dim() == 2 or (device_type == "cpu" and operands[1].dim() >= 2))
        )
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    return any(t.is_floating_point() for t in tensors)


class _OpRecorder(TorchDispatchMode):
    """Records the ops the mode has no account of (`uncovered_op`)."""

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type
        self.uncovered: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if uncovered_op(func, args, kwargs, self.device_type):
            self.uncovered.add(str(func))
        return func(*args, **kwargs)


def check_kernel_coverage(model: torch.nn.Module) -> None:
    """Run a probe (a left-padded 2-row prefill, then one cached step) and raise NotImplementedError naming every op
    the backbone called that the batch-invariant mode does not cover."""
    from transformers import DynamicCache

    parameter = next(model.parameters())
    device = parameter.device
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.arange(6, device=device).reshape(2, 3) % vocab
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]], device=device)
    recorder = _OpRecorder(device.type)
    with torch.inference_mode(), recorder:
        cache = DynamicCache(config=model.config)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        model(
            input_ids=ids[:, :1],
            attention_mask=step_mask,
            position_ids=positions[:, -1:] + 1,
            past_key_values=cache,
            use_cache=True,
        )
    if recorder.uncovered:
        raise NotImplementedError(
            f"batch_invariant does not cover {', '.join(sorted(recorder.uncovered))}, which "
            f"{type(model).__name__} calls: its rounding may depend on the batch. Run without batch_invariant."
        )
