"""Latent steps (LatentMAS §3): feed a transformed last hidden state back as the next input embedding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from diffmas_eval.core.batch_invariant import kernels_for
from diffmas_eval.core.trace import KVTrace, extend_trace

if TYPE_CHECKING:
    from diffmas_eval.core.backbone import Backbone

RIDGE = 1e-5


@dataclass
class LatentAligner:
    """Maps a final hidden state to an input embedding: `(h @ W_a) * target_norm / max(||h @ W_a||, 1e-6)`.

    Attributes:
        matrix: `W_a [D, D]` in float32, or None for the identity (realignment off; the norm rescale still applies).
        target_norm: mean L2 norm of the input embedding rows.
    """

    matrix: torch.Tensor | None
    target_norm: float

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden [B, D]` -> aligned embedding `[B, D]` in `hidden`'s dtype."""
        h = hidden.float()
        if self.matrix is not None:
            h = h @ self.matrix
        h = h * (self.target_norm / h.norm(dim=-1, keepdim=True).clamp(min=1e-6))
        return h.to(hidden.dtype)


def build_aligner(backbone: Backbone, realign: bool) -> LatentAligner:
    """Solve `W_a = (W_out^T W_out + λI)^-1 W_out^T W_in` (λ = 1e-5, float32) once for a backbone.

    For tied embeddings `W_a ≈ I`. With `realign=False` the matrix is skipped and only the norm rescale applies.
    """
    with torch.no_grad():
        w_in = backbone.input_embeddings.detach().float()
        target_norm = float(w_in.norm(dim=1).mean())
        if not realign:
            return LatentAligner(matrix=None, target_norm=target_norm)
        w_out = backbone.output_embeddings.detach().float()
        gram = w_out.T @ w_out + RIDGE * torch.eye(w_out.shape[1], device=w_out.device)
        matrix = torch.linalg.solve(gram, w_out.T @ w_in)
    return LatentAligner(matrix=matrix, target_norm=target_norm)


def run_latent_steps(
    backbone: Backbone,
    trace: KVTrace,
    hidden: torch.Tensor,
    steps: int,
    aligner: LatentAligner,
    record: list[torch.Tensor] | None = None,
) -> tuple[KVTrace, torch.Tensor]:
    """Take `steps` latent steps: each feeds `aligner(hidden)` as one input position and reads the new hidden state.

    Args:
        trace: consumed (its cache is extended in place by `steps` positions, all real), even when `steps == 0`.
        hidden: `[B, D]` last hidden state of the previous position.
        record: if given, each fed embedding `[B, D]` is appended (tests rebuild the sequence from them).

    Returns:
        (trace, last hidden state `[B, D]`).
    """
    trace = KVTrace(*trace.consume())  # the caller's handle is retired whatever `steps` is, as by any extension
    ones = torch.ones((trace.batch_size, 1), dtype=trace.mask.dtype, device=trace.mask.device)
    for step in range(steps):
        trace.reserve(steps - step)
        with kernels_for(backbone.model):  # the aligner's product runs outside forwards: rows must stand alone too
            embedding = aligner(hidden)
        if record is not None:
            record.append(embedding.detach())
        trace, hidden = extend_trace(backbone, trace, ones, inputs_embeds=embedding[:, None, :], output="hidden")
    return trace, hidden
