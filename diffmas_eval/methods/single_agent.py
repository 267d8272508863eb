"""Single agent (methods.md §1): one generation from the question and the format instruction."""

from __future__ import annotations

from typing import Any

from diffmas_eval.core.decode import DecodingConfig
from diffmas_eval.methods.base import FinalAgentStart, Method, Question


class SingleAgent(Method):
    name = "single-agent"
    family = "single_agent"

    def prepare(self, questions: list[Question], decoding: DecodingConfig) -> FinalAgentStart:
        return FinalAgentStart(
            prompts=[self.final_prompt(q) for q in questions], trace=None, agents=[[] for _ in questions]
        )

    @property
    def upstream_roles(self) -> list[str]:
        return []

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "topology": None, "max_new_tokens": None, "communication": "none"}
