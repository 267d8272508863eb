"""The backbone fingerprint: every weight counts, the load dtype, directory and CPU kernels do not."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from diffmas_eval.core.backbone import load_backbone, model_fingerprint


def _fingerprint(path: Path, dtype: str, **kwargs) -> str:
    return load_backbone(str(path), dtype=dtype, device="cpu", **kwargs).fingerprint


def _resaved_copy(source: Path, target: Path, dtype: torch.dtype = torch.float32, edit=None) -> Path:
    """`source` saved again into `target` in `dtype`, after `edit(model)` if given (tokenizer files copied as is)."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(source, target)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.to(dtype).save_pretrained(target)
    return target


def test_a_fine_tune_with_frozen_embeddings_has_another_fingerprint(tiny_model_dir, tmp_path):
    def shift_one_mlp(model) -> None:
        model.model.layers[1].mlp.down_proj.weight.add_(1e-2)

    tuned = _resaved_copy(tiny_model_dir, tmp_path / "tuned", edit=shift_one_mlp)
    assert _fingerprint(tuned, "float32") != _fingerprint(tiny_model_dir, "float32")
    assert _fingerprint(tuned, "bfloat16") != _fingerprint(tiny_model_dir, "bfloat16")


def test_the_same_weights_elsewhere_in_bfloat16_or_float32_have_one_fingerprint(tiny_model_dir, tmp_path):
    reference = _fingerprint(tiny_model_dir, "float32")
    elsewhere = shutil.copytree(tiny_model_dir, tmp_path / "elsewhere")
    assert _fingerprint(elsewhere, "bfloat16") == reference
    assert _fingerprint(elsewhere, "float32", fast_cpu_kernels=False) == reference
    saved_in_bf16 = _resaved_copy(tiny_model_dir, tmp_path / "bf16", dtype=torch.bfloat16)
    assert _fingerprint(saved_in_bf16, "float32") == reference


def test_packed_cpu_linears_leave_the_fingerprint_unchanged(tiny_model_dir):
    backbone = load_backbone(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    ids = torch.tensor([backbone.render_chat("What is 2 + 3?", system=None, enable_thinking=None)])
    with torch.no_grad():
        backbone.model(input_ids=ids)  # fills the oneDNN-packed weight copies, where this build has them
    assert model_fingerprint(backbone.causal_lm) == backbone.fingerprint
