"""LatentMAS (methods.md §3): upstream agents append their prompts and m latent steps to one shared KV trace.

Differences from the reference code, on purpose: with m = 0 the judger still reads the trace; batches are
left-padded with real masks and positions (no pad token's hidden state is ever read); transformers 5 cache API;
any decoder-only HF architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffmas_eval.core.backbone import Backbone
from diffmas_eval.core.decode import DecodingConfig
from diffmas_eval.core.latent import LatentAligner, build_aligner, run_latent_steps
from diffmas_eval.core.trace import KVTrace, append_prompts
from diffmas_eval.methods.base import AgentCall, FinalAgentStart, Method, MultiAgentConfig, Question
from diffmas_eval.methods.registry import register_method
from diffmas_eval.settings import setting

COMMUNICATION_MODES = ("trace", "none", "other_doc")


@dataclass
class LatentMASConfig(MultiAgentConfig):
    latent_steps: int | None = setting(
        "m: latent steps per upstream agent (0 allowed: the judger still reads the trace).", 10
    )
    realign: bool | None = setting(
        "Use the ridge alignment map W_a (else identity; the norm rescale applies either way).", False
    )
    communication: str = setting(
        "trace; controls: none (final agent alone, same prompt), other_doc (another document's trace).", "trace"
    )

    def validate(self) -> None:
        super().validate()
        steps = self.latent_steps
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 0):
            raise ValueError(f"latent_steps must be an integer >= 0, got {steps!r}")
        if self.communication not in COMMUNICATION_MODES:
            raise ValueError(
                f"unknown communication {self.communication!r}; use one of {', '.join(COMMUNICATION_MODES)}"
            )


@register_method
class LatentMAS(Method):
    """Sequential: planner, critic, refiner each prefill onto the cumulative trace and take m latent steps; the judger
    decodes on top. Hierarchical: the math, science and code agents chain through the same cumulative trace."""

    name = "latent-mas"
    family = "latent_mas"
    config_class = LatentMASConfig
    description = "LatentMAS (arXiv 2511.20639): upstream agents prefill one KV trace and take m latent steps"
    default_communication = "trace"

    def __init__(self, backbone: Backbone, config: LatentMASConfig | None = None, **settings: Any) -> None:
        super().__init__(backbone, config, **settings)
        self.latent_steps = int(self.config.latent_steps or 0)
        self.realign = bool(self.config.realign)
        self.communication = self.config.communication
        self._aligner: LatentAligner | None = None
        self.recorded_latents: list[list[torch.Tensor]] | None = None  # set to [] to record fed embeddings per agent

    @property
    def aligner(self) -> LatentAligner:
        """The alignment map, solved once per method instance (the one-time cost of realignment)."""
        if self._aligner is None:
            self._aligner = build_aligner(self.backbone, self.realign)
        return self._aligner

    def run_agent(self, role: str, prompts: list[list[int]], trace: KVTrace | None) -> KVTrace:
        """One upstream agent under its adapter: prefill its prompts onto `trace` (consumed), then m latent steps.

        Evaluation and training (`training/trace_nll.py`, in the autograd graph) both build traces through this."""
        record = [] if self.recorded_latents is not None else None
        with self.acting_as(role):
            trace, hidden = append_prompts(self.backbone, trace, prompts, output="hidden")
            trace, _ = run_latent_steps(self.backbone, trace, hidden, self.latent_steps, self.aligner, record)
        if record is not None:
            self.recorded_latents.append(record)
        return trace

    def build_trace(self, trace_questions: list[str], agents: list[list[AgentCall]]) -> KVTrace | None:
        """Run every upstream agent on the cumulative trace: prefill its prompt, then m latent steps."""
        trace = None
        for role in self.upstream_roles:
            prompts = [self.render(role, text) for text in trace_questions]
            trace = self.run_agent(role, prompts, trace)
            for row, prompt in enumerate(prompts):
                agents[row].append(AgentCall(role=role, prompt_tokens=len(prompt), latent_steps=self.latent_steps))
        return trace

    def prepare(self, questions: list[Question], decoding: DecodingConfig) -> FinalAgentStart:
        agents: list[list[AgentCall]] = [[] for _ in questions]
        trace = None
        if self.communication != "none":
            texts = [q.trace_text if self.communication == "other_doc" else q.text for q in questions]
            if self.communication == "other_doc" and any(t is None for t in texts):
                raise ValueError("communication=other_doc needs each question's trace_text (another document)")
            trace = self.build_trace(texts, agents)
        return FinalAgentStart(prompts=[self.final_prompt(q) for q in questions], trace=trace, agents=agents)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "latent_steps": self.latent_steps, "realign": self.realign}
