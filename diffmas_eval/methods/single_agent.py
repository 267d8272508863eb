"""Single agent (methods.md §1): one generation from the question and the format instruction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffmas_eval.core.backbone import Backbone
from diffmas_eval.core.decode import DecodingConfig
from diffmas_eval.methods.adapter import attach_adapter
from diffmas_eval.methods.base import FinalAgentStart, Method, MethodConfig, Question
from diffmas_eval.methods.registry import register_method
from diffmas_eval.settings import setting


@dataclass
class SingleAgentConfig(MethodConfig):
    adapter: str | None = setting(
        "Shared LoRA adapter from `diffmas-train --method single-agent` (the LoRA single-agent control).",
        identity=False,
    )


@register_method
class SingleAgent(Method):
    """One agent. With `adapter=DIR` (a shared adapter from `diffmas-train --method single-agent`) it is the LoRA
    single-agent control: the same fine-tuning budget as DiffMAS without any communication."""

    name = "single-agent"
    family = "single_agent"
    config_class = SingleAgentConfig
    description = "one generation (baseline); adapter=DIR gives the LoRA single-agent control"
    default_communication = "none"
    objective = "diffmas_eval.training.trace_nll:TraceNLL"

    def __init__(self, backbone: Backbone, config: SingleAgentConfig | None = None, **settings: Any) -> None:
        super().__init__(backbone, config, **settings)
        self.adapter_manifest = attach_adapter(backbone, self.config.adapter) if self.config.adapter else None
        if self.adapter_manifest and self.adapter_manifest.get("adapters") == "per_role":
            raise ValueError(
                f"adapter {self.config.adapter} holds one adapter per role; a single agent needs a shared adapter"
            )

    def prepare(self, questions: list[Question], decoding: DecodingConfig) -> FinalAgentStart:
        return FinalAgentStart(
            prompts=[self.final_prompt(q) for q in questions], trace=None, agents=[[] for _ in questions]
        )

    @property
    def upstream_roles(self) -> list[str]:
        return []

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), **adapter_settings(self.config.adapter, self.adapter_manifest)}

    @classmethod
    def is_control(cls, identity: dict[str, Any]) -> bool:
        return bool(identity.get("adapter") or identity.get("adapter_fingerprint"))


def adapter_settings(adapter: str | None, manifest: dict[str, Any] | None) -> dict[str, Any]:
    """What results record of an attached adapter: its path as given, its weights' fingerprint, how it was trained."""
    if manifest is None:
        return {"adapter": None}
    trained = {k: manifest.get(k) for k in ("method", "latent_steps", "topology", "adapters", "frozen_trace")}
    return {"adapter": adapter, "adapter_fingerprint": manifest["fingerprint"], "adapter_training": trained}
