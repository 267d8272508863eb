"""TextMAS (methods.md §2): upstream agents write text; the judger reads the whole transcript."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffmas_eval.core.backbone import Backbone
from diffmas_eval.core.decode import DecodingConfig, derive_seed, generate
from diffmas_eval.methods.adapter import attach_adapter
from diffmas_eval.methods.base import AgentCall, FinalAgentStart, Method, MultiAgentConfig, Question
from diffmas_eval.methods.registry import register_method
from diffmas_eval.methods.single_agent import adapter_settings
from diffmas_eval.settings import setting


@dataclass
class TextMASConfig(MultiAgentConfig):
    max_new_tokens: int = setting("Budget of each upstream text agent (tokens).", 256)
    adapter: str | None = setting(
        "LoRA adapter(s) from `diffmas-train` (shared, or one per role); each role runs under its own.",
        identity=False,
    )
    upstream_model: str | None = setting(
        "Another model for the upstream agents (hub id, local directory or embedded name; default: pretrained, which "
        "then runs the final agent only). With topology=two_stage: the text-to-text (T2T) baseline of C2C.",
        identity=False,
    )

    def validate(self) -> None:
        super().validate()
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.upstream_model and self.adapter:
            raise ValueError("adapter and upstream_model cannot be combined (the adapter belongs to pretrained)")


@register_method
class TextMAS(Method):
    """Sequential: planner -> critic -> refiner -> judger, each reading the transcript so far.
    Hierarchical: math, science and code solvers answer independently (one batched decode), a summarizer judges."""

    name = "text-mas"
    family = "text_mas"
    config_class = TextMASConfig
    description = "TextMAS: upstream agents write text; the final agent reads the transcript"
    default_communication = "text"

    def __init__(
        self, backbone: Backbone, config: TextMASConfig | None = None, upstream: Backbone | None = None, **settings: Any
    ) -> None:
        """`backbone` runs the final agent, and the upstream agents too unless `upstream` (another model) is given."""
        super().__init__(backbone, config, **settings)
        self.max_new_tokens = self.config.max_new_tokens
        self.adapter_manifest = attach_adapter(backbone, self.config.adapter) if self.config.adapter else None
        self.upstream = upstream or backbone

    @classmethod
    def load(cls, config: TextMASConfig, device: Any = None) -> TextMAS:
        config.validate()
        backbone = config.load_backbone(config.pretrained, device)
        same = config.upstream_model in (None, config.pretrained)
        upstream = None if same else config.load_backbone(config.upstream_model, device)
        return cls(backbone, config, upstream=upstream)

    def backbones(self) -> dict[str, Backbone]:
        if self.upstream is self.backbone:
            return super().backbones()
        return {"backbone": self.backbone, "upstream": self.upstream}

    def render_upstream(self, role: str, question: str, transcript: str) -> list[int]:
        """Token ids of an upstream agent's chat turn in the upstream model's chat template."""
        if self.upstream is self.backbone:
            return self.render(role, question, transcript)
        user = self.prompts.render(self.family, self.topology, role, question, transcript)
        return self.upstream.render_chat(user, system=self.system_prompt, enable_thinking=self.enable_thinking)

    def _run_agents(
        self,
        role_rows: list[tuple[str, int]],
        questions: list[Question],
        transcripts: list[str],
        decoding: DecodingConfig,
        agents: list[list[AgentCall]],
    ) -> list[str]:
        """Decode one text turn for every (role, row) pair; returns the texts in that order.

        Pairs of all roles are one batched decode when the roles share weights; roles with their own adapters
        decode as one batch per role, each under its adapter."""
        prompts = [self.render_upstream(role, questions[row].text, transcripts[row]) for role, row in role_rows]
        seeds = [derive_seed(questions[row].seed, role) for role, row in role_rows]
        own = self.role_adapters()
        groups: dict[str | None, list[int]] = {}
        for index, (role, _) in enumerate(role_rows):
            groups.setdefault(role if role in own else None, []).append(index)
        outputs: list[Any] = [None] * len(role_rows)
        for indices in groups.values():
            with self.acting_as(role_rows[indices[0]][0]):  # a no-op for roles without their own adapter
                decoded = generate(
                    self.upstream,
                    [prompts[i] for i in indices],
                    None,
                    decoding.for_upstream(self.max_new_tokens),
                    [seeds[i] for i in indices],
                )
            for index, out in zip(indices, decoded, strict=True):
                outputs[index] = out
        for (role, row), prompt, out in zip(role_rows, prompts, outputs, strict=True):
            agents[row].append(
                AgentCall(role=role, prompt_tokens=len(prompt), generated_tokens=len(out.token_ids), text=out.text)
            )
        return [out.text for out in outputs]

    def prepare(self, questions: list[Question], decoding: DecodingConfig) -> FinalAgentStart:
        rows = range(len(questions))
        transcripts = [""] * len(questions)
        agents: list[list[AgentCall]] = [[] for _ in questions]
        if self.topology == "sequential":
            for role in self.upstream_roles:
                texts = self._run_agents([(role, r) for r in rows], questions, transcripts, decoding, agents)
                transcripts = [
                    t + self.prompts.transcript_entry(role, text) for t, text in zip(transcripts, texts, strict=True)
                ]
        else:
            pairs = [(role, r) for role in self.upstream_roles for r in rows]
            texts = self._run_agents(pairs, questions, transcripts, decoding, agents)
            for (role, r), text in zip(pairs, texts, strict=True):
                transcripts[r] += self.prompts.transcript_entry(role, text)
        return FinalAgentStart(
            prompts=[self.final_prompt(q, t) for q, t in zip(questions, transcripts, strict=True)],
            trace=None,
            agents=agents,
        )

    def settings(self) -> dict[str, Any]:
        info = {**super().settings(), **adapter_settings(self.config.adapter, self.adapter_manifest)}
        if self.upstream is not self.backbone:
            info["upstream_model"] = self.upstream.name
        return info
