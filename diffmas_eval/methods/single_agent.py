"""Single agent (methods.md §1): one generation from the question and the format instruction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffmas_eval.core.backbone import Backbone
from diffmas_eval.core.decode import DecodingConfig
from diffmas_eval.methods.base import FinalAgentStart, Method, Question
from diffmas_eval.methods.diffmas import attach_adapter, read_adapter_config
from diffmas_eval.prompts import PromptSet


class SingleAgent(Method):
    """One agent. With `adapter=DIR` (a shared adapter from `diffmas-train --method single-agent`) it is the LoRA
    single-agent control: the same fine-tuning budget as DiffMAS without any communication."""

    name = "single-agent"
    family = "single_agent"

    def __init__(
        self, backbone: Backbone, prompts: PromptSet, *, adapter: str | Path | None = None, **kwargs: Any
    ) -> None:
        super().__init__(backbone, prompts, **kwargs)
        if adapter and read_adapter_config(adapter).get("adapters") == "per_role":
            raise ValueError(f"adapter {adapter} holds one adapter per role; a single agent needs a shared adapter")
        self.adapter = str(adapter) if adapter else None
        self.adapter_config = attach_adapter(backbone, adapter) if adapter else None

    def prepare(self, questions: list[Question], decoding: DecodingConfig) -> FinalAgentStart:
        return FinalAgentStart(
            prompts=[self.final_prompt(q) for q in questions], trace=None, agents=[[] for _ in questions]
        )

    @property
    def upstream_roles(self) -> list[str]:
        return []

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "topology": None,
            "max_new_tokens": None,
            "communication": "none",
            "adapter": self.adapter,
        }
