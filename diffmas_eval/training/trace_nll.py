"""The trace-NLL objective (DiffMAS, and the LoRA single-agent control): LoRA adapters on a frozen backbone, trained
on the final agent's next-token loss on the target through the multi-agent trace (`training/unroll.py`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from diffmas_eval.core.backbone import Backbone, load_backbone
from diffmas_eval.methods.base import Method
from diffmas_eval.methods.latent_mas import LatentMAS
from diffmas_eval.methods.single_agent import SingleAgent
from diffmas_eval.prompts import FINAL_ROLE
from diffmas_eval.training.config import TrainConfig
from diffmas_eval.training.data import TrainItem
from diffmas_eval.training.lora import attach_lora
from diffmas_eval.training.objective import Objective
from diffmas_eval.training.unroll import EncodedExample, TraceLoss, encode_items

logger = logging.getLogger(__name__)


def build_method(backbone: Backbone, config: TrainConfig) -> Method:
    """The evaluation method whose prompts, roles and latent steps training reproduces (no adapter yet)."""
    common = {
        "prompts": config.prompts,
        "system_prompt": config.system_prompt,
        "enable_thinking": config.enable_thinking,
    }
    if config.method == "single-agent":
        return SingleAgent(backbone, **common)
    return LatentMAS(
        backbone, topology=config.topology, latent_steps=config.latent_steps, realign=config.realign, **common
    )


def build_loss(backbone: Backbone, method: Method, config: TrainConfig) -> TraceLoss:
    """The training loss for `method` with the config's m, adapter layout, trace coupling and recompute."""
    return TraceLoss(
        backbone,
        method,
        latent_steps=config.latent_steps,
        per_role=config.adapters == "per_role",
        frozen_trace=config.frozen_trace,
        recompute=config.recompute,
    )


def check_lengths(examples: list[EncodedExample], config: TrainConfig, limit: int) -> tuple[list[EncodedExample], int]:
    """Drop (skip_too_long) or refuse examples longer than the context limit; returns (kept, dropped)."""
    m = config.latent_steps
    long = [ex for ex in examples if ex.total_length(m) > limit]
    if long and not config.skip_too_long:
        first = long[0]
        raise ValueError(
            f"{len(long)} training item(s) exceed max_length={limit} tokens, e.g. {first.id} of {first.source} needs "
            f"{first.total_length(m)} (agents' prompts, {m} latent steps each, judger prompt and "
            f"{len(first.target)}-token target); raise max_length, lower latent_steps, or pass --skip_too_long"
        )
    kept = [ex for ex in examples if ex.total_length(m) <= limit]
    if not kept:
        raise ValueError(f"every training item exceeds max_length={limit}; raise max_length")
    return kept, len(long)


class TraceNLL(Objective):
    """LoRA adapter(s), one shared or one per role, trained on the target NLL through the trace.

    Args:
        backbone: an already loaded backbone without an adapter (tests inspect it afterwards); default: load
            `config.pretrained`.
    """

    def __init__(self, config: TrainConfig, device: Any, backbone: Backbone | None = None) -> None:
        super().__init__(config, device)
        self.backbone = backbone or load_backbone(config.pretrained, dtype=config.dtype, device=device)
        self.method = build_method(self.backbone, config)
        self.dropped_too_long = 0
        self._trainable: list[tuple[str, torch.nn.Parameter]] | None = None
        self._loss: TraceLoss | None = None

    def encode(self, items: list[TrainItem]) -> list[EncodedExample]:
        examples = encode_items(self.backbone, self.method, items, self.config.append_eos)
        limit = self.config.max_length or int(getattr(self.backbone.causal_lm.config, "max_position_embeddings", 2048))
        examples, self.dropped_too_long = check_lengths(examples, self.config, limit)
        return examples

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        if self._trainable is None:
            config = self.config
            torch.manual_seed(config.seed)  # the same fresh adapter on every process
            self._trainable = attach_lora(
                self.backbone,
                [*self.method.upstream_roles, FINAL_ROLE],
                per_role=config.adapters == "per_role",
                r=config.lora_r,
                alpha=config.lora_alpha,
                dropout=config.lora_dropout,
                target_modules=config.lora_target_modules,
            )
            self._loss = build_loss(self.backbone, self.method, config)
            if config.recompute and self._loss.single_sequence:
                self.backbone.causal_lm.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
        return self._trainable

    def loss(self, batch: list[EncodedExample]) -> torch.Tensor:
        return self._loss(batch).sum()

    def weight(self, example: EncodedExample) -> int:
        return len(example.target)

    def positions(self, example: EncodedExample) -> int:
        return example.total_length(self.config.latent_steps)

    def train_mode(self) -> None:
        self.backbone.model.train()

    def backbones(self) -> dict[str, Backbone]:
        return {"backbone": self.backbone}

    def save(self, output_dir: Path) -> None:
        self.backbone.model.save_pretrained(str(output_dir))

    def manifest(self) -> dict[str, Any]:
        config, method = self.config, self.method
        return {
            "adapters": config.adapters,
            "roles": self._loss.roles,
            "topology": None if config.method == "single-agent" else config.topology,
            "latent_steps": config.latent_steps,
            "realign": config.realign,
            "frozen_trace": config.frozen_trace,
            "formulation": self._loss.formulation,
            "prompts": {"name": method.prompts.name, "sha256": method.prompts.sha256},
            "system_prompt": method.system_prompt,
            "enable_thinking": config.enable_thinking,
            "lora": {
                "r": config.lora_r,
                "alpha": config.lora_alpha,
                "dropout": config.lora_dropout,
                "target_modules": config.lora_target_modules,
            },
        }
