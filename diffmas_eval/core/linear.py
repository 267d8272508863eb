"""Linear layers on CPU with weights pre-packed for oneDNN.

Decode and latent steps multiply 1-8 rows by every weight of the model, so a step is bound by how the matrix kernel
reads the weights. oneDNN's pre-packed path (`torch.ops.mkldnn._linear_pointwise`, an op PyTorch ships for its
compiler's CPU backend) lays each weight out once in the blocked format its kernels read, where `F.linear` starts
from the plain layout on every call. Measured on the default model, 1 thread (`benchmarks/bench_decode_step.py`,
`results/perf/decode_step_*.md`): a padded batch-8 decode step 1.41x faster in fp32 and a batch-1 step 1.20x faster
in bf16; fp32 batch 1 and bf16 batch 8 within noise.

Only inference on CPU in float32/bfloat16 takes this path; anything recorded by autograd (training), other devices
and dtypes call `F.linear` as before, except frozen bf16 weights on a CPU without bf16 kernels, which train through
float32 (`PackedCPULinear._widened_forward`). The packed copy is rebuilt when the weight is replaced or modified in
place (peft merging an adapter), and costs one extra copy of the linear weights in memory (a float32 one, twice the
size, for bf16 weights on a CPU that cannot pack bf16: `packed_compute_dtype`).
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F

PACKED_DTYPES = (torch.float32, torch.bfloat16)


def packed_linear_available(dtype: torch.dtype | None = None) -> bool:
    """Whether this PyTorch build has the oneDNN pre-packed linear ops and, given `dtype`, whether this CPU can run
    them for weights of that dtype (natively, or bf16 through float32: see `packed_compute_dtype`)."""
    ops = torch.ops.mkldnn
    built = (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_linear_pointwise")
        and hasattr(ops, "_reorder_linear_weight")
    )
    return built and (dtype is None or packed_compute_dtype(dtype) is not None)


def packed_compute_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the packed kernels multiply `dtype` weights in: `dtype` itself where this CPU's oneDNN packs it;
    float32 for bf16 on a CPU that cannot (oneDNN's bf16 packing needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT, so an
    AVX2-only CPU such as AMD Zen 3 refuses it, and its stock bf16 matrix products run about 4x slower than float32).
    The float32 route is the same arithmetic as a bf16 kernel (the product of two bf16 numbers is exact in float32,
    and bf16 kernels accumulate in float32) up to summation order, with the output rounded to bf16; it holds a
    float32 copy of the weights. None: nothing packs this dtype."""
    if _cpu_packs(dtype):
        return dtype
    if dtype == torch.bfloat16 and _cpu_packs(torch.float32):
        return torch.float32
    return None


@functools.cache
def _cpu_packs(dtype: torch.dtype) -> bool:
    """One packing of a tiny weight, to learn whether this CPU's oneDNN supports `dtype` (cached per process; the
    batch-invariant mode also packs float16)."""
    if not dtype.is_floating_point:
        return False
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), None)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 8, dtype=dtype), packed, None, "none", [], "")
    except RuntimeError:
        return False
    return True


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight [N, K]` in oneDNN's packed layout, in `packed_compute_dtype(weight.dtype)` (callers check that it is
    not None)."""
    compute = packed_compute_dtype(weight.dtype)
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(compute), None)


def packed_linear(rows: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`rows [M, K] @ weight^T + bias` with a weight from `pack_linear_weight`; the result in `rows`' dtype."""
    if rows.dtype == packed.dtype:
        return torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    bias = None if bias is None else bias.to(packed.dtype)
    out = torch.ops.mkldnn._linear_pointwise(rows.to(packed.dtype), packed, bias, "none", [], "")
    return out.to(rows.dtype)


class PackedCPULinear(torch.nn.Linear):
    """`nn.Linear` whose inference forward on CPU uses a oneDNN-packed copy of its weight (see the module docstring).

    Modules become this class in place (`use_packed_cpu_linear`), so parameters, state dicts, peft wrapping and
    `isinstance(module, nn.Linear)` are unchanged.
    """

    _packed: tuple[tuple[int, int, torch.dtype], torch.Tensor] | None = None
    _widened: tuple[tuple[int, int, torch.dtype], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (
            x.device.type != "cpu"
            or weight.device.type != "cpu"
            or x.dtype != weight.dtype
            or weight.dtype not in PACKED_DTYPES
            or not packed_linear_available(weight.dtype)
        ):
            return F.linear(x, weight, self.bias)
        if torch.is_grad_enabled():
            if weight.requires_grad or packed_compute_dtype(weight.dtype) == weight.dtype:
                return F.linear(x, weight, self.bias)
            return self._widened_forward(x)
        key = (weight.data_ptr(), weight._version, weight.dtype)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, pack_linear_weight(weight))
        out = packed_linear(x.reshape(-1, x.shape[-1]), self._packed[1], self.bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _widened_forward(self, x: torch.Tensor) -> torch.Tensor:
        """A frozen bf16 weight under autograd (LoRA training) on a CPU without bf16 kernels: the float32 route of
        `packed_compute_dtype` through `F.linear` (differentiable in `x`; oneDNN's packed op has no backward), with
        a cached float32 copy of the weight. Gradients reach `x` in float32 and are rounded to bf16, as a bf16
        kernel's backward rounds them."""
        weight = self.weight
        key = (weight.data_ptr(), weight._version, weight.dtype)
        if self._widened is None or self._widened[0] != key:
            self._widened = (key, weight.detach().float())
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self._widened[1], bias).to(x.dtype)


def use_packed_cpu_linear(model: torch.nn.Module) -> int:
    """Turn every plain `nn.Linear` of a CPU model into a `PackedCPULinear`; returns how many were switched.

    Does nothing (returns 0) when the model is not on CPU, not float32/bfloat16, or the PyTorch build or this CPU
    cannot pack weights of its dtype.
    """
    parameter = next(model.parameters())
    if (
        parameter.device.type != "cpu"
        or parameter.dtype not in PACKED_DTYPES
        or not packed_linear_available(parameter.dtype)
    ):
        return 0
    switched = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = PackedCPULinear
            switched += 1
    return switched


def uses_packed_cpu_linear(model: torch.nn.Module) -> bool:
    """Whether `model`'s inference linears on CPU run with oneDNN-packed weights (recorded in results as
    `cpu_kernels`): linears switched by `use_packed_cpu_linear`, or the batch-invariant mode's when it packs them
    (`core/batch_invariant.py`)."""
    from diffmas_eval.core.batch_invariant import is_batch_invariant

    if is_batch_invariant(model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        parameter = next(model.parameters())
        return (
            base._diffmas_pack_weights and parameter.device.type == "cpu" and packed_linear_available(parameter.dtype)
        )
    return any(isinstance(module, PackedCPULinear) for module in model.modules())


def cpu_kernels_label(model: torch.nn.Module) -> str:
    """What results record as `cpu_kernels`: `packed`, `packed via float32` (bf16 on a CPU that cannot pack bf16) or
    `stock`."""
    if not uses_packed_cpu_linear(model):
        return "stock"
    dtype = next(model.parameters()).dtype
    compute = packed_compute_dtype(dtype)
    return "packed" if compute in (None, dtype) else f"packed via {str(compute).removeprefix('torch.')}"
