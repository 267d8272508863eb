"""The C2C fuser objective (methods.md §5): both models frozen, only the fuser trains, on the receiver's next-token
loss on the target through the fused cache.

An example is the receiver's single-agent prompt (the evaluation prompt, format instruction included) and the target.
The loss runs exactly the evaluation path (`C2C.fused_trace`): both models prefill every prompt token but the last
without gradients, the fuser (in training mode: dropout, Gumbel-sigmoid gates) fuses the sharer's cache into the
receiver's, and the receiver reads `[last prompt token; target]` on top of the fused cache; the loss is the target's
negative log-likelihood. The gate temperature anneals per optimizer step (`on_step`), as the reference's
`update_temperature`: exponentially from `initial_temperature` to `final_temperature` over `anneal_steps` steps
(default: the whole run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffmas_eval.core.backbone import Backbone, load_backbone
from diffmas_eval.core.trace import left_pad, positions_for_block
from diffmas_eval.methods.c2c import C2C, check_same_tokenizer
from diffmas_eval.methods.c2c_fuser import FFN_KINDS, MAPPINGS, C2CFuser, FuserConfig, KVShape, gate_temperature
from diffmas_eval.settings import setting
from diffmas_eval.training.config import TrainConfig
from diffmas_eval.training.data import TrainItem
from diffmas_eval.training.objective import Objective
from diffmas_eval.training.unroll import EncodedExample, encode_items


@dataclass
class C2CSettings:
    """`diffmas-train --method c2c` options beside TrainConfig's (`pretrained` is the receiver). Sizes default to the
    reference recipe's (`C2C_0.6+0.5.json`)."""

    sharer: str | None = setting("Sharer model: hub id, local HF directory or embedded name (required for c2c).")
    hidden_dim: int = setting("Fuser hidden size (after the input projection).", 1024)
    intermediate_dim: int = setting("Fuser feed-forward intermediate size.", 1024)
    num_layers: int = setting("Fuser depth: input, common block and (num_layers - 2) projection blocks (>= 3).", 3)
    fuser_dropout: float = setting("Dropout in the fuser's feed-forward blocks.", 0.1)
    ffn: str = setting("Fuser feed-forward block: gelu (the reference code's) or swiglu (its docstrings').", "gelu")
    mapping: str = setting("Receiver-to-sharer layer mapping: last_aligned.", "last_aligned")
    initial_temperature: float = setting("Gumbel-sigmoid gate temperature at the first step.", 1.0)
    final_temperature: float = setting("Gate temperature reached after anneal_steps.", 0.001)
    anneal_steps: int | None = setting("Steps over which the temperature anneals (default: the whole run).")

    def validate(self) -> None:
        if not self.sharer:
            raise ValueError("c2c training needs --sharer MODEL (the model whose cache is fused into the receiver's)")
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"ffn must be one of {', '.join(FFN_KINDS)}, got {self.ffn!r}")
        if self.mapping not in MAPPINGS:
            raise ValueError(f"mapping must be one of {', '.join(MAPPINGS)}, got {self.mapping!r}")
        if self.num_layers < 3:
            raise ValueError(f"num_layers must be >= 3, got {self.num_layers}")
        if min(self.hidden_dim, self.intermediate_dim) < 1:
            raise ValueError("hidden_dim and intermediate_dim must be >= 1")
        if not 0.0 <= self.fuser_dropout < 1.0:
            raise ValueError(f"fuser_dropout must be in [0, 1), got {self.fuser_dropout}")
        if not 0 < self.final_temperature <= self.initial_temperature:
            raise ValueError("temperatures must satisfy 0 < final_temperature <= initial_temperature")
        if self.anneal_steps is not None and self.anneal_steps < 1:
            raise ValueError("anneal_steps must be >= 1")


def target_nll(backbone: Backbone, hidden: torch.Tensor, targets: list[tuple[int, ...]]) -> torch.Tensor:
    """Summed -log p(target) per row `[B]` (float32) from the final hidden states `[B, L, D]` of left-padded blocks
    that end with each row's target; the LM head runs on the target positions only."""
    width, device = hidden.shape[1], hidden.device
    rows = torch.tensor([row for row, t in enumerate(targets) for _ in t], device=device)
    cols = torch.tensor([width - len(t) - 1 + i for t in targets for i in range(len(t))], device=device)
    labels = torch.tensor([token for t in targets for token in t], device=device)
    logits = backbone.causal_lm.get_output_embeddings()(hidden[rows, cols]).float()
    token_nll = -torch.log_softmax(logits, dim=-1).gather(-1, labels[:, None]).squeeze(-1)
    return torch.zeros(len(targets), dtype=torch.float32, device=device).index_add(0, rows, token_nll)


class C2CObjective(Objective):
    """A fresh fuser between a frozen receiver (`pretrained`) and sharer, trained on the receiver's target NLL.

    Args:
        backbone: an already loaded receiver (tests inspect it afterwards); default: load `config.pretrained`.
        sharer: an already loaded sharer; default: load the `sharer` setting.
    """

    settings_class = C2CSettings

    def __init__(
        self, config: TrainConfig, device: Any, backbone: Backbone | None = None, sharer: Backbone | None = None
    ) -> None:
        super().__init__(config, device)
        if config.latent_steps or config.adapters != "shared" or config.frozen_trace or config.topology != "sequential":
            raise ValueError(
                "method=c2c has no agents or adapters: drop latent_steps, adapters, frozen_trace and topology"
            )
        settings: C2CSettings = self.settings
        settings.validate()
        self.receiver = backbone or load_backbone(config.pretrained, dtype=config.dtype, device=device)
        self.sharer = sharer or load_backbone(settings.sharer, dtype=config.dtype, device=device)
        check_same_tokenizer(self.receiver.tokenizer, self.sharer.tokenizer, self.receiver.name, self.sharer.name)
        self.fuser_config = FuserConfig(
            receiver=KVShape.of(self.receiver.causal_lm),
            sharer=KVShape.of(self.sharer.causal_lm),
            hidden_dim=settings.hidden_dim,
            intermediate_dim=settings.intermediate_dim,
            num_layers=settings.num_layers,
            dropout=settings.fuser_dropout,
            ffn=settings.ffn,
            mapping=settings.mapping,
        )
        self.fuser_config.validate()
        self.method: C2C | None = None
        self.dropped_too_long = 0

    def _build_method(self) -> C2C:
        """The evaluation method over the loaded models with a fresh fuser (seeded: the same on every process)."""
        config = self.config
        torch.manual_seed(config.seed)
        fuser = C2CFuser(self.fuser_config).to(self.receiver.device)
        return C2C(
            self.receiver,
            sharer=self.sharer,
            fuser=fuser,
            prompts=config.prompts,
            system_prompt=config.system_prompt,
            enable_thinking=config.enable_thinking,
        )

    def encode(self, items: list[TrainItem]) -> list[EncodedExample]:
        if self.method is None:
            self.method = self._build_method()
        examples = encode_items(self.receiver, self.method, items, self.config.append_eos)
        limit = self.config.max_length or int(getattr(self.receiver.causal_lm.config, "max_position_embeddings", 2048))
        long = [ex for ex in examples if len(ex.final_prompt) + len(ex.target) > limit]
        if long and not self.config.skip_too_long:
            raise ValueError(
                f"{len(long)} training item(s) exceed max_length={limit} tokens, e.g. {long[0].id} of "
                f"{long[0].source}; raise max_length or pass --skip_too_long"
            )
        self.dropped_too_long = len(long)
        kept = [ex for ex in examples if len(ex.final_prompt) + len(ex.target) <= limit]
        if not kept:
            raise ValueError(f"every training item exceeds max_length={limit}; raise max_length")
        return kept

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        if self.method is None:
            self.method = self._build_method()
        fuser = self.method.fuser
        fuser.requires_grad_(True)
        return [(f"fuser.{name}", param) for name, param in fuser.named_parameters()]

    def on_step(self, step: int, total_steps: int) -> None:
        settings: C2CSettings = self.settings
        self.method.fuser.temperature = gate_temperature(
            step, settings.anneal_steps or total_steps, settings.initial_temperature, settings.final_temperature
        )

    def loss(self, batch: list[EncodedExample]) -> torch.Tensor:
        contexts = [list(ex.final_prompt[:-1]) for ex in batch]
        trace, _ = self.method.fused_trace(contexts, contexts)
        blocks = [list(ex.final_prompt[-1:] + ex.target) for ex in batch]
        ids, block_mask = left_pad(blocks, self.receiver.pad_token_id, self.receiver.device)
        full_mask = torch.cat([trace.mask, block_mask], dim=1)
        hidden = self.receiver.decoder(
            input_ids=ids,
            attention_mask=full_mask,
            position_ids=positions_for_block(full_mask, ids.shape[1]),
            past_key_values=trace.cache,
            use_cache=True,
        ).last_hidden_state
        return target_nll(self.receiver, hidden, [ex.target for ex in batch]).sum()

    def weight(self, example: EncodedExample) -> int:
        return len(example.target)

    def positions(self, example: EncodedExample) -> int:
        return 2 * (len(example.final_prompt) - 1) + 1 + len(example.target)

    def train_mode(self) -> None:
        self.method.fuser.train()

    def backbones(self) -> dict[str, Backbone]:
        return {"receiver": self.receiver, "sharer": self.sharer}

    def save(self, output_dir: Path) -> None:
        self.method.fuser.save(output_dir)

    def manifest(self) -> dict[str, Any]:
        settings: C2CSettings = self.settings
        method = self.method
        return {
            "fuser": self.fuser_config.to_dict(),
            "fuser_parameters": method.fuser.parameter_count(),
            "layer_map": method.fuser.layer_map,
            "gate_logits": {
                "key": [float(layer.key_gate_logit.detach()) for layer in method.fuser.layers],
                "value": [float(layer.value_gate_logit.detach()) for layer in method.fuser.layers],
            },
            "temperature": {
                "initial": settings.initial_temperature,
                "final": settings.final_temperature,
                "anneal_steps": settings.anneal_steps,
            },
            "prompts": {"name": method.prompts.name, "sha256": method.prompts.sha256},
            "system_prompt": method.system_prompt,
            "enable_thinking": self.config.enable_thinking,
        }
