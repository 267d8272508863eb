"""CPU linears with oneDNN-packed weights: `F.linear`'s results, repacked when weights change, autograd untouched."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from diffmas_eval.core import linear
from diffmas_eval.core.backbone import load_backbone
from diffmas_eval.core.decode import DecodingConfig, generate
from diffmas_eval.core.linear import (
    PackedCPULinear,
    packed_linear_available,
    use_packed_cpu_linear,
    uses_packed_cpu_linear,
)

pytestmark = pytest.mark.skipif(not packed_linear_available(), reason="this PyTorch build has no oneDNN linear ops")
# oneDNN packs bf16 weights natively only on CPUs with AVX-512 BW/VL/DQ or AVX-NE-CONVERT; elsewhere through float32.
PACKABLE_DTYPES = [
    pytest.param(
        dtype,
        marks=pytest.mark.skipif(not packed_linear_available(dtype), reason=f"this CPU cannot pack {dtype} weights"),
    )
    for dtype in (torch.float32, torch.bfloat16)
]


def _packed_linear(in_features: int, out_features: int, dtype: torch.dtype, bias: bool = True) -> torch.nn.Linear:
    torch.manual_seed(0)
    module = torch.nn.Linear(in_features, out_features, bias=bias).to(dtype)
    assert use_packed_cpu_linear(torch.nn.Sequential(module)) == 1
    return module


def _bias(module: torch.nn.Linear, rows: int) -> torch.Tensor:
    return module.bias.detach().expand(rows, -1)


@pytest.mark.parametrize("dtype", PACKABLE_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_same_result_as_f_linear_for_any_leading_shape(dtype, bias):
    module = _packed_linear(24, 40, dtype, bias)
    assert isinstance(module, PackedCPULinear) and isinstance(module, torch.nn.Linear)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for shape in [(1, 24), (8, 24), (2, 7, 24)]:
        x = torch.randn(*shape, dtype=dtype)
        with torch.no_grad():
            ours = module(x)
        assert module._packed is not None and ours.shape == (*shape[:-1], 40)
        stock = F.linear(x, module.weight, module.bias)
        torch.testing.assert_close(ours.float(), stock.float(), rtol=tolerance, atol=tolerance)


def test_a_modified_weight_is_packed_again():
    module = _packed_linear(16, 8, torch.float32)
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = module(x)
        module.weight.mul_(2.0)  # what peft's merge does: an in-place change of the same tensor
        after_in_place = module(x)
        module.weight = torch.nn.Parameter(torch.zeros(8, 16))
        after_replaced = module(x)
    torch.testing.assert_close(after_in_place - _bias(module, 3), 2 * (before - _bias(module, 3)))
    torch.testing.assert_close(after_replaced, _bias(module, 3))


def test_autograd_takes_the_stock_path():
    module = _packed_linear(16, 8, torch.float32)
    module.weight.requires_grad_(True)
    x = torch.randn(3, 16, requires_grad=True)
    module(x).sum().backward()
    assert module._packed is None  # nothing was packed while autograd recorded
    torch.testing.assert_close(x.grad, module.weight.detach().sum(dim=0).expand(3, -1))
    assert module.weight.grad is not None


def test_models_switch_on_cpu_only_in_float32_and_bfloat16():
    assert use_packed_cpu_linear(torch.nn.Sequential(torch.nn.Linear(4, 4).half())) == 0
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert use_packed_cpu_linear(model) == 2 and use_packed_cpu_linear(model) == 0  # switching twice is a no-op


@pytest.mark.parametrize("dtype", PACKABLE_DTYPES)
def test_backbones_decode_the_same_with_and_without_packed_linears(tiny_model_dir, dtype):
    dtype = str(dtype).removeprefix("torch.")
    fast = load_backbone(str(tiny_model_dir), dtype=dtype, device="cpu")
    stock = load_backbone(str(tiny_model_dir), dtype=dtype, device="cpu", fast_cpu_kernels=False)
    assert any(isinstance(m, PackedCPULinear) for m in fast.model.modules())
    assert not any(isinstance(m, PackedCPULinear) for m in stock.model.modules())
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    outputs = [generate(b, prompts, None, DecodingConfig(max_new_tokens=12)) for b in (fast, stock)]
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_bf16_packs_through_float32_on_a_cpu_that_cannot_pack_bf16(tiny_model_dir, monkeypatch, batch_invariant):
    """An AVX2-only CPU (no oneDNN bf16 packing): bf16 linears multiply a packed float32 copy of the weight, which is
    a bf16 kernel's arithmetic (exact bf16 products, float32 sums) with the output rounded to bf16."""
    monkeypatch.setattr(linear, "_cpu_packs", lambda dtype: dtype == torch.float32)
    assert linear.packed_compute_dtype(torch.bfloat16) == torch.float32
    module = _packed_linear(64, 48, torch.bfloat16)
    x = torch.randn(5, 64).to(torch.bfloat16)
    with torch.no_grad():
        ours = module(x)
    assert ours.dtype == torch.bfloat16 and module._packed is not None
    exact = F.linear(x.float(), module.weight.float(), module.bias.float())  # bf16 products are exact in float32
    torch.testing.assert_close(ours.float(), exact.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)
    assert (ours.float() - exact).abs().max() <= (exact.abs().max() * 2**-8)  # within one bf16 rounding
    backbone = load_backbone(str(tiny_model_dir), dtype="bfloat16", device="cpu", batch_invariant=batch_invariant)
    assert uses_packed_cpu_linear(backbone.model) and linear.cpu_kernels_label(backbone.model) == "packed via float32"
    (row,) = generate(backbone, [[5, 6, 7, 8, 9]], None, DecodingConfig(max_new_tokens=12))
    assert row.token_ids


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_a_cpu_that_packs_nothing_runs_the_stock_kernels(tiny_model_dir, monkeypatch, batch_invariant):
    monkeypatch.setattr(linear, "_cpu_packs", lambda dtype: False)
    assert not packed_linear_available(torch.bfloat16) and not packed_linear_available(torch.float32)
    assert use_packed_cpu_linear(torch.nn.Sequential(torch.nn.Linear(4, 4).to(torch.bfloat16))) == 0
    assert use_packed_cpu_linear(torch.nn.Sequential(torch.nn.Linear(4, 4))) == 0
    backbone = load_backbone(str(tiny_model_dir), dtype="bfloat16", device="cpu", batch_invariant=batch_invariant)
    assert not uses_packed_cpu_linear(backbone.model) and linear.cpu_kernels_label(backbone.model) == "stock"
    stock = load_backbone(str(tiny_model_dir), dtype="bfloat16", device="cpu", fast_cpu_kernels=False)
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    outputs = [generate(b, prompts, None, DecodingConfig(max_new_tokens=12)) for b in (backbone, stock)]
    assert all(row.token_ids for row in outputs[0])
    if not batch_invariant:  # the same stock linears (the batch-invariant mode's tiles may round differently)
        assert outputs[0] == outputs[1]


def test_frozen_bf16_weights_train_through_float32_on_a_cpu_that_cannot_pack_bf16(monkeypatch):
    """LoRA training on an AVX2-only CPU: gradients reach the input through a float32 copy of the frozen weight; a
    weight that trains keeps the stock path (its gradient is bf16, as before)."""
    monkeypatch.setattr(linear, "_cpu_packs", lambda dtype: dtype == torch.float32)
    frozen = _packed_linear(32, 24, torch.bfloat16).requires_grad_(False)
    x = torch.randn(3, 32).to(torch.bfloat16).requires_grad_(True)
    out = frozen(x)
    out.float().square().sum().backward()
    assert frozen._widened is not None and frozen._widened[1].dtype == torch.float32 and frozen._packed is None
    assert out.dtype == x.grad.dtype == torch.bfloat16 and frozen.weight.grad is None
    reference_x = x.detach().float().requires_grad_(True)
    reference = F.linear(reference_x, frozen.weight.float(), frozen.bias.float())
    reference.to(torch.bfloat16).float().square().sum().backward()
    torch.testing.assert_close(out.float(), reference.to(torch.bfloat16).float())
    torch.testing.assert_close(x.grad.float(), reference_x.grad.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)
    trained = _packed_linear(32, 24, torch.bfloat16)
    trained(x).float().sum().backward()
    assert trained._widened is None and trained.weight.grad is not None
