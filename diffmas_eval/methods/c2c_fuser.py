"""The C2C fuser (methods.md §5; the reference's `C2CProjector`): one projector per receiver layer that projects the
sharer's keys and values of a token into the receiver's KV space and adds them to the receiver's own, behind a
learned layer gate.

Per receiver layer and separately for K and for V (`KVProjector`):
1. the sharer's and the receiver's heads of the same token, flattened and concatenated, `Linear -> hidden_dim`;
2. one residual feed-forward block (pre-RMSNorm, `dropout`), the common embedding;
3. a projection branch (`num_layers - 2` blocks, `Linear -> receiver heads x head_dim`) and a weight branch
   (one block, `Linear -> receiver heads`, sigmoid): a per-token, per-head weight `w` in (0, 1);
4. a scalar gate logit per layer (one for K, one for V, initialised to 0): in training a Gumbel-sigmoid
   `sigmoid((logit + g) / tau)` with `g` drawn per (row, head, token) and `tau` annealed per step; at inference the hard
   gate `1[logit > 0]`, so a fresh fuser is closed everywhere.

Fusion is residual: `K = K_receiver + gate * w * K_projected` (same for V). Receiver layer `t` reads sharer layer
`clamp(S - T + t, 0, S - 1)` ("last aligned": the last layers face each other; with a shallower sharer the first
receiver layers all read its layer 0), as the reference's `last_aligned_sources` with one source per layer.

The feed-forward blocks of the reference code are a plain two-matrix MLP with GELU (`StandardFFNLayer`), although its
docstrings and methods.md describe SwiGLU; `ffn="gelu"` (default) builds the code's block, `ffn="swiglu"` the
documented one.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

FUSER_WEIGHTS = "fuser.safetensors"
FUSER_CONFIG = "fuser_config.json"
FFN_KINDS = ("gelu", "swiglu")
MAPPINGS = ("last_aligned",)


@dataclass(frozen=True)
class KVShape:
    """The KV geometry of one model: decoder layers, KV heads and head dimension."""

    layers: int
    kv_heads: int
    head_dim: int

    @property
    def width(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def of(cls, causal_lm: Any) -> KVShape:
        """From a HF causal LM's config (head_dim defaults to hidden_size / attention heads)."""
        config = causal_lm.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim)


@dataclass(frozen=True)
class FuserConfig:
    """Everything that builds a fuser: the two models' KV geometry and the projector sizes (saved beside the weights).

    The defaults of the sizes are the reference recipe's (`C2C_0.6+0.5.json`)."""

    receiver: KVShape
    sharer: KVShape
    hidden_dim: int = 1024
    intermediate_dim: int = 1024
    num_layers: int = 3
    dropout: float = 0.1
    ffn: str = "gelu"
    mapping: str = "last_aligned"

    def validate(self) -> None:
        if self.num_layers < 3:
            raise ValueError(f"fuser num_layers must be >= 3 (input, common block, branches), got {self.num_layers}")
        if self.hidden_dim < 1 or self.intermediate_dim < 1:
            raise ValueError("fuser hidden_dim and intermediate_dim must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"fuser dropout must be in [0, 1), got {self.dropout}")
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"fuser ffn must be one of {', '.join(FFN_KINDS)}, got {self.ffn!r}")
        if self.mapping not in MAPPINGS:
            raise ValueError(f"fuser mapping must be one of {', '.join(MAPPINGS)}, got {self.mapping!r}")

    def layer_map(self) -> list[int]:
        """Sharer layer read by each receiver layer (last aligned)."""
        offset = self.sharer.layers - self.receiver.layers
        return [min(max(offset + t, 0), self.sharer.layers - 1) for t in range(self.receiver.layers)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FuserConfig:
        values = dict(data)
        values["receiver"] = KVShape(**values["receiver"])
        values["sharer"] = KVShape(**values["sharer"])
        return cls(**values)


def gate_temperature(step: int, anneal_steps: int, initial: float, final: float) -> float:
    """The Gumbel-sigmoid temperature before optimizer step `step` (1-based): exponential from `initial` at step 1 to
    `final` at step `anneal_steps + 1` and after (the reference's `update_temperature`)."""
    ratio = min(max(step - 1, 0) / max(anneal_steps, 1), 1.0)
    return initial * (final / initial) ** ratio


class FeedForwardBlock(nn.Module):
    """`x + dropout(ffn(rmsnorm(x)))`, bias-free; `ffn` is `W2 gelu(W1 h)` or SwiGLU `W2 (silu(Wg h) * Wu h)`."""

    def __init__(self, width: int, intermediate: int, dropout: float, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.norm = nn.RMSNorm(width, eps=1e-6)
        self.w1 = nn.Linear(width, intermediate, bias=False)
        self.gate = nn.Linear(width, intermediate, bias=False) if kind == "swiglu" else None
        self.w2 = nn.Linear(intermediate, width, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        h = nn.functional.silu(self.gate(h)) * self.w1(h) if self.gate is not None else nn.functional.gelu(self.w1(h))
        return x + self.drop(self.w2(h))


class KVProjector(nn.Module):
    """One stack (for K or for V) of one receiver layer: token features -> projected KV and per-head weight."""

    def __init__(self, config: FuserConfig) -> None:
        super().__init__()
        hidden, blocks = config.hidden_dim, config.num_layers - 2

        def block(intermediate: int) -> FeedForwardBlock:
            return FeedForwardBlock(hidden, intermediate, config.dropout, config.ffn)

        self.receiver_heads, self.head_dim = config.receiver.kv_heads, config.receiver.head_dim
        self.input = nn.Linear(config.sharer.width + config.receiver.width, hidden)
        self.common = block(config.intermediate_dim)
        self.projection = nn.Sequential(*[block(config.intermediate_dim) for _ in range(blocks)])
        self.projection_out = nn.Linear(hidden, config.receiver.width)
        self.weight_branch = block(hidden)
        self.weight_out = nn.Linear(hidden, config.receiver.kv_heads)

    def forward(self, sharer: torch.Tensor, receiver: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`sharer [B, Hs, N, Ds]`, `receiver [B, Ht, N, Dt]` -> projected `[B, Ht, N, Dt]`, weight `[B, Ht, N, 1]`."""
        batch, _, tokens, _ = receiver.shape
        features = torch.cat([_flatten_heads(sharer), _flatten_heads(receiver)], dim=-1)
        hidden = self.common(self.input(features))
        projected = self.projection_out(self.projection(hidden))
        projected = projected.view(batch, tokens, self.receiver_heads, self.head_dim).transpose(1, 2)
        weight = torch.sigmoid(self.weight_out(self.weight_branch(hidden))).transpose(1, 2).unsqueeze(-1)
        return projected, weight

    def flops_per_token(self) -> int:
        """Multiply-adds x 2 of the linear layers for one token (norms and activations left out)."""
        return sum(2 * m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))


def _flatten_heads(x: torch.Tensor) -> torch.Tensor:
    """`[B, H, N, D]` -> `[B, N, H * D]`."""
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * dim)


class LayerFuser(nn.Module):
    """The K and V stacks of one receiver layer and their scalar gate logits."""

    def __init__(self, config: FuserConfig) -> None:
        super().__init__()
        self.key = KVProjector(config)
        self.value = KVProjector(config)
        self.key_gate_logit = nn.Parameter(torch.zeros(()))
        self.value_gate_logit = nn.Parameter(torch.zeros(()))

    def open_gates(self) -> tuple[bool, bool]:
        """Which hard gates (inference) are open: (K, V)."""
        return bool(self.key_gate_logit > 0), bool(self.value_gate_logit > 0)

    def gate(self, logit: torch.Tensor, shape: tuple[int, ...], temperature: float) -> torch.Tensor:
        """Gumbel-sigmoid gate of `shape` in training (noise per element), the hard gate at inference."""
        if not self.training:
            return (logit > 0).to(logit.dtype).expand(shape)
        uniform = torch.rand(shape, dtype=logit.dtype, device=logit.device)
        gumbel = -torch.log(-torch.log(uniform + 1e-20) + 1e-20)
        return torch.sigmoid((logit + gumbel) / temperature)

    def forward(
        self,
        sharer_kv: tuple[torch.Tensor, torch.Tensor],
        receiver_kv: tuple[torch.Tensor, torch.Tensor],
        temperature: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused (K, V) `[B, Ht, N, Dt]` of the receiver from both models' (K, V) of the same N tokens.

        At inference a closed gate's stack is not run: the receiver's tensor is returned as it is (exactly what the
        residual gives with gate 0)."""
        out = []
        open_gates = self.open_gates() if not self.training else (True, True)
        for stack, logit, is_open, source, target in zip(
            (self.key, self.value),
            (self.key_gate_logit, self.value_gate_logit),
            open_gates,
            sharer_kv,
            receiver_kv,
            strict=True,
        ):
            if not is_open:
                out.append(target)
                continue
            dtype = logit.dtype
            projected, weight = stack(source.to(dtype), target.to(dtype))
            gate = self.gate(logit, weight.shape, temperature)
            out.append(target + (gate * weight * projected).to(target.dtype))
        return out[0], out[1]


class C2CFuser(nn.Module):
    """One `LayerFuser` per receiver layer, the layer map, and the gate temperature (set per training step)."""

    def __init__(self, config: FuserConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.layer_map = config.layer_map()
        self.layers = nn.ModuleList([LayerFuser(config) for _ in range(config.receiver.layers)])
        self.temperature = 1.0

    def fuse_layer(
        self,
        index: int,
        sharer_kv: tuple[torch.Tensor, torch.Tensor],
        receiver_kv: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Receiver layer `index`'s fused (K, V); `sharer_kv` is sharer layer `layer_map[index]`'s."""
        return self.layers[index](sharer_kv, receiver_kv, self.temperature)

    def open_layers(self) -> list[int]:
        """Receiver layers with at least one open hard gate (the only ones inference changes)."""
        return [i for i, layer in enumerate(self.layers) if any(layer.open_gates())]

    def flops_per_token(self) -> int:
        """Inference FLOPs per fused token: the linear layers of every open stack."""
        total = 0
        for layer in self.layers:
            key_open, value_open = layer.open_gates()
            total += key_open * layer.key.flops_per_token() + value_open * layer.value.flops_per_token()
        return total

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, directory: str | Path) -> None:
        """Write `fuser.safetensors` and `fuser_config.json` into `directory`."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in self.state_dict().items()
        }
        save_file(state, str(directory / FUSER_WEIGHTS))
        (directory / FUSER_CONFIG).write_text(json.dumps(self.config.to_dict(), indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> C2CFuser:
        """A fuser from a directory written by `save` (float32, eval mode)."""
        from safetensors.torch import load_file

        directory = Path(directory).expanduser()
        if not (directory / FUSER_WEIGHTS).is_file() or not (directory / FUSER_CONFIG).is_file():
            raise FileNotFoundError(
                f"{directory} holds no C2C fuser ({FUSER_WEIGHTS} and {FUSER_CONFIG}); train one with "
                "`diffmas-train --method c2c`"
            )
        fuser = cls(FuserConfig.from_dict(json.loads((directory / FUSER_CONFIG).read_text())))
        fuser.load_state_dict(load_file(str(directory / FUSER_WEIGHTS)))
        return fuser.eval()


def expected_shapes(receiver: KVShape, sharer: KVShape, config: FuserConfig, directory: Any) -> None:
    """Refuse a fuser built for other KV geometries than the loaded models' (a cheap check beside the fingerprints)."""
    for role, loaded, saved in (("receiver", receiver, config.receiver), ("sharer", sharer, config.sharer)):
        if loaded != saved:
            raise ValueError(
                f"fuser {directory} was built for a {role} with {saved.layers} layers, {saved.kv_heads} KV heads of "
                f"dimension {saved.head_dim}, but the loaded {role} has {loaded.layers}, {loaded.kv_heads} and "
                f"{loaded.head_dim}; load the models it was trained on"
            )
