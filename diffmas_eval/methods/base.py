"""The one abstraction every method implements: given a batch of questions, what does the final agent start from?

A method returns a `FinalAgentStart`: the final agent's rendered prompt per row and, for latent methods, the KV
trace it reads. Decoding (`core.decode.generate`) and scoring (`core.score.score_continuations`) are written once
against that answer; a new method is one file with a `prepare`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from diffmas_eval.core.backbone import Backbone
from diffmas_eval.core.decode import DecodingConfig
from diffmas_eval.core.trace import KVTrace
from diffmas_eval.prompts import FINAL_ROLE, TOPOLOGIES, PromptSet


@dataclass
class Question:
    """One request as a method sees it.

    Attributes:
        text: the task's bare problem (lm-eval's context string).
        answer_format: which format instruction the final agent gets (None: no instruction).
        seed: this request's seed (sampling draws depend only on it, never on batch composition).
        trace_text: what the upstream agents read instead of `text` (the `other_doc` control), or None.
    """

    text: str
    answer_format: str | None = None
    seed: int = 0
    trace_text: str | None = None


@dataclass
class AgentCall:
    """Accounting of one upstream agent on one row."""

    role: str
    prompt_tokens: int
    generated_tokens: int = 0
    latent_steps: int = 0
    text: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {
            "role": self.role,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "latent_steps": self.latent_steps,
        }
        if self.text is not None:
            out["text"] = self.text
        return out


@dataclass
class FinalAgentStart:
    """What the final agent starts from, for a batch of `B` rows.

    Attributes:
        prompts: the final agent's rendered chat prompt per row (token ids).
        trace: the KV working memory `[B, T]` it reads, or None (single agent, TextMAS, `communication=none`).
        agents: per row, the upstream agents' accounting, in order.
    """

    prompts: list[list[int]]
    trace: KVTrace | None
    agents: list[list[AgentCall]] = field(default_factory=list)

    def trace_tokens(self) -> list[int]:
        """Real positions of the trace handed to the final agent, per row (0 without a trace)."""
        return self.trace.real_lengths() if self.trace is not None else [0] * len(self.prompts)


class Method(ABC):
    """A communication method over one backbone. Subclasses set `name` and `family` and implement `prepare`."""

    name: ClassVar[str]
    family: ClassVar[str]  # which table of the prompt set: single_agent, text_mas, latent_mas

    def __init__(
        self,
        backbone: Backbone,
        prompts: PromptSet,
        *,
        topology: str = "sequential",
        system_prompt: str | None = None,
        enable_thinking: bool | None = None,
        max_new_tokens: int = 256,
    ) -> None:
        if topology not in TOPOLOGIES:
            raise ValueError(f"unknown topology {topology!r}; use one of {', '.join(TOPOLOGIES)}")
        self.backbone = backbone
        self.prompts = prompts
        self.topology = topology
        self.system_prompt = prompts.system if system_prompt is None else system_prompt
        self.enable_thinking = enable_thinking
        self.max_new_tokens = int(max_new_tokens)

    @property
    def upstream_roles(self) -> list[str]:
        """The agents before the final one, in order."""
        return [r for r in self.prompts.roles(self.family, self.topology) if r != FINAL_ROLE]

    def render(self, role: str, question: str, transcript: str = "", answer_format: str | None = None) -> list[int]:
        """Token ids of one agent's chat turn, ending with the generation prompt."""
        user = self.prompts.render(self.family, self.topology, role, question, transcript, answer_format)
        return self.backbone.render_chat(user, system=self.system_prompt, enable_thinking=self.enable_thinking)

    def final_prompt(self, question: Question, transcript: str = "") -> list[int]:
        return self.render(FINAL_ROLE, question.text, transcript, question.answer_format)

    @abstractmethod
    def prepare(self, questions: list[Question], decoding: DecodingConfig) -> FinalAgentStart:
        """Run the upstream agents for a batch and return the final agent's starting point.

        Args:
            questions: the batch.
            decoding: the final agent's decoding settings (text agents reuse its sampling settings with their own
                `max_new_tokens` budget).
        """

    @contextlib.contextmanager
    def acting_as(self, role: str) -> Iterator[None]:
        """Context in which `role` runs (DiffMAS switches per-role adapters here); a no-op by default."""
        yield

    def settings(self) -> dict[str, Any]:
        """Every setting that changes what this method computes (recorded in results)."""
        return {
            "method": self.name,
            "topology": self.topology,
            "max_new_tokens": self.max_new_tokens,
            "enable_thinking": self.enable_thinking,
            "system_prompt": self.system_prompt,
        }
