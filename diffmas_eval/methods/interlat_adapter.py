"""Interlat's trained modules (methods.md §6): the message adapter, which maps a sender's hidden states into the
receiver's input embeddings and owns the begin/end markers, and the compression student's latent bridge.

Both are plain `nn.Module`s kept in float32 whatever the models' dtype; inputs are cast in and outputs cast back by
the callers. They are saved as safetensors files with their shape in the metadata (`save_module` / `load_module`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from diffmas_eval.core.trace import append_prompts, extend_trace

if TYPE_CHECKING:
    from diffmas_eval.core.backbone import Backbone

ADAPTER_FILE = "message_adapter.safetensors"
STUDENT_FILE = "compression_student.safetensors"


@dataclass(frozen=True)
class AdapterShape:
    """Sizes of a message adapter.

    Attributes:
        sender_dim: the sender's hidden size (an input projection is added when it differs from `receiver_dim`).
        receiver_dim: the receiver's embedding size.
        num_heads: heads of the self-attention over the message (must divide `receiver_dim`).
        dropout: attention dropout (training only).
        clamp: outputs are clamped to [-clamp, clamp].
    """

    sender_dim: int
    receiver_dim: int
    num_heads: int = 8
    dropout: float = 0.1
    clamp: float = 10.0


class MessageAdapter(nn.Module):
    """`A`: optional input projection -> LayerNorm -> multi-head self-attention with a residual -> LayerNorm ->
    scaled residual MLP -> clamp; plus the learned `begin_marker` and `end_marker` vectors that bracket the message
    in the receiver's input.

    The scaled residual MLP ("adaptive projection" in the reference code) is `(x·s + MLP(x·s))·o` with learned
    scalars `s` (init 0.2) and `o` (`output_scale`, init 0.1) and `MLP = Linear -> GELU -> LayerNorm -> Linear`, the
    last layer initialised near zero. With `output_scale = 0` the adapter outputs exact zeros.
    """

    def __init__(self, shape: AdapterShape) -> None:
        super().__init__()
        if shape.receiver_dim % shape.num_heads:
            raise ValueError(
                f"adapter_heads={shape.num_heads} must divide the receiver's hidden size {shape.receiver_dim}"
            )
        self.shape = shape
        dim = shape.receiver_dim
        self.input_projection = nn.Linear(shape.sender_dim, dim) if shape.sender_dim != dim else None
        self.pre_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attention = nn.MultiheadAttention(dim, shape.num_heads, dropout=shape.dropout, batch_first=True)
        self.post_norm = nn.LayerNorm(dim, eps=1e-6)
        self.scale = nn.Parameter(torch.tensor(0.2))
        self.output_scale = nn.Parameter(torch.tensor(0.1))
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim), nn.Linear(dim, dim))
        self.begin_marker = nn.Parameter(torch.zeros(dim))
        self.end_marker = nn.Parameter(torch.zeros(dim))
        self._init_weights()

    def _init_weights(self) -> None:
        # As the reference: small query/key/value projections, zero biases, a near-zero last MLP layer.
        nn.init.xavier_uniform_(self.attention.in_proj_weight, gain=1.0 / math.sqrt(3))
        nn.init.zeros_(self.attention.in_proj_bias)
        nn.init.xavier_uniform_(self.attention.out_proj.weight)
        nn.init.zeros_(self.attention.out_proj.bias)
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.xavier_uniform_(self.mlp[3].weight, gain=1e-2)
        nn.init.zeros_(self.mlp[3].bias)

    def init_markers(self, begin: torch.Tensor, end: torch.Tensor) -> None:
        """Set the markers (e.g. to the mean embedding of a marker text; `[receiver_dim]` each)."""
        with torch.no_grad():
            self.begin_marker.copy_(begin.float())
            self.end_marker.copy_(end.float())

    def forward(self, messages: list[torch.Tensor]) -> list[torch.Tensor]:
        """Map each message `[L_i, sender_dim]` (any float dtype) to `[L_i, receiver_dim]` float32.

        Each message is processed on its own (no padding), so a row's output never depends on the other rows."""
        return [self._one(message) for message in messages]

    def _one(self, message: torch.Tensor) -> torch.Tensor:
        x = message.to(self.pre_norm.weight.dtype)[None]
        if self.input_projection is not None:
            x = self.input_projection(x)
        normed = self.pre_norm(x)
        attended, _ = self.attention(normed, normed, normed, need_weights=False)
        x = self.post_norm(normed + attended)
        residual = x * self.scale
        out = (residual + self.mlp(residual)) * self.output_scale
        return out.clamp(-self.shape.clamp, self.shape.clamp)[0]


@dataclass(frozen=True)
class StudentShape:
    """Sizes of the compression student's latent bridge: the student model's hidden size."""

    hidden_dim: int


class CompressionStudent(nn.Module):
    """The student's latent bridge: a learned start vector fed as the first latent input, and `h2e = LayerNorm ->
    Linear (no bias)` that turns each latent (a last-layer hidden state) into the next input embedding."""

    def __init__(self, shape: StudentShape) -> None:
        super().__init__()
        self.shape = shape
        self.start = nn.Parameter(torch.randn(shape.hidden_dim) * 0.02)
        self.h2e = nn.Sequential(
            nn.LayerNorm(shape.hidden_dim), nn.Linear(shape.hidden_dim, shape.hidden_dim, bias=False)
        )


def student_latents(
    backbone: Backbone, prompts: list[list[int]], student: CompressionStudent, steps: int
) -> torch.Tensor:
    """Run the student: prefill `prompts`, then `steps` latent steps, each one forward of one position.

    The first step feeds `student.start`; step k+1 feeds `h2e(z_k)`, where `z_k` is the last-layer hidden state of
    step k. In the autograd graph when gradients are enabled.

    Returns:
        The latents `z_1..z_K` as `[B, K, D]` in the backbone's dtype.
    """
    trace, _ = append_prompts(backbone, None, prompts, output="hidden")
    batch = len(prompts)
    ones = torch.ones((batch, 1), dtype=trace.mask.dtype, device=trace.mask.device)
    step_input = student.start.to(backbone.device, backbone.dtype).expand(batch, 1, -1)
    latents = []
    for step in range(steps):
        trace.reserve(steps - step)
        trace, latent = extend_trace(backbone, trace, ones, inputs_embeds=step_input, output="hidden")
        latents.append(latent)
        step_input = student.h2e(latent.float()).to(backbone.dtype)[:, None]
    return torch.stack(latents, dim=1)


def save_module(module: MessageAdapter | CompressionStudent, path: Path) -> None:
    """Write the module's weights and shape to a safetensors file, atomically."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in module.state_dict().items()}
    save_file(state, str(tmp), metadata={"shape": json.dumps(asdict(module.shape)), "class": type(module).__name__})
    os.replace(tmp, path)


def load_module(path: Path) -> MessageAdapter | CompressionStudent:
    """Rebuild a module written by `save_module` (in eval mode, frozen)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the directory is not a complete `diffmas-train --method interlat` run"
        )
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    kinds = {"MessageAdapter": (MessageAdapter, AdapterShape), "CompressionStudent": (CompressionStudent, StudentShape)}
    module_class, shape_class = kinds[metadata["class"]]
    module = module_class(shape_class(**json.loads(metadata["shape"])))
    module.load_state_dict(load_file(str(path)))
    module.eval()
    module.requires_grad_(False)
    return module
