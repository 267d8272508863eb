"""The one abstraction every method implements: given a batch of questions, what does the final agent start from?

A method is one module that declares
- a settings dataclass (`MethodConfig` subclass): its model args with types, defaults, one-line help and whether each
  is part of the run's identity, validated before any weights load;
- the `Method` subclass, registered with `@register_method`, which loads and owns the models it names (one backbone
  or several, plus trained modules) and implements `prepare`;
- optionally a training objective (`Method.objective`, see `training/objective.py`).

`prepare` returns a `FinalAgentStart`: which model decodes or scores the final agent, its rendered prompt per row
(optionally as input embeddings) and, for latent methods, the KV trace it reads. Decoding (`core.decode.generate`)
and scoring (`core.score.score_continuations`) are written once against that answer.
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from diffmas_eval.core.backbone import Backbone, load_backbone, resolve_dtype
from diffmas_eval.core.batch_invariant import is_batch_invariant
from diffmas_eval.core.decode import DecodingConfig
from diffmas_eval.core.trace import KVTrace
from diffmas_eval.prompts import FINAL_ROLE, TOPOLOGIES, PromptSet, load_prompt_set
from diffmas_eval.settings import build_settings, identity_fields, setting


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
        trace: the KV working memory `[B, T]` it reads, or None (single agent, TextMAS, `communication=none`). It
            belongs to `backbone`'s cache layout and is consumed by decoding or scoring.
        agents: per row, the upstream agents' accounting, in order.
        backbone: the model that decodes or scores the final agent (it may differ from the upstream agents' model,
            e.g. C2C's receiver); None means the method's own `backbone`.
        prompt_embeds: per row, the prompt as input embeddings `[len(prompts[row]), D]` of `backbone` (e.g. a
            message spliced between markers), used instead of embedding `prompts`; None: token ids only.
        extra_cost: per row, method-specific accounting added to the side-car (e.g. sharer tokens, fuser seconds).
    """

    prompts: list[list[int]]
    trace: KVTrace | None
    agents: list[list[AgentCall]] = field(default_factory=list)
    backbone: Backbone | None = None
    prompt_embeds: list[torch.Tensor] | None = None
    extra_cost: list[dict[str, Any]] | None = None

    def trace_tokens(self) -> list[int]:
        """Real positions of the trace handed to the final agent, per row (0 without a trace)."""
        return self.trace.real_lengths() if self.trace is not None else [0] * len(self.prompts)


@dataclass
class MethodConfig:
    """Model args every method takes: which backbone to load and how, and the agents' prompt settings.

    Subclasses add their own fields with `settings.setting(help, default, identity=...)`. Fields marked
    `identity=False` do not change what is computed (or enter the identity through a resolved value instead, such as
    the backbone's weight fingerprint for `pretrained`).
    """

    pretrained: str | None = setting(
        "Backbone: hub id, local HF directory or embedded model name (default: the embedded default model).",
        identity=False,
    )
    dtype: str = setting("auto (the checkpoint's), float32, bfloat16 or float16.", "auto", identity=False)
    prompts: str | None = setting("Prompt set name or YAML path (default diffmas-v1).", identity=False)
    system_prompt: str | None = setting("System message of every agent (default: the prompt set's).")
    enable_thinking: bool | None = setting("Passed to the chat template (Qwen3-style thinking switch).")
    fast_cpu_kernels: bool = setting(
        "On CPU: oneDNN-packed linears and the packed 16-bit attention path; False = transformers' stock kernels.",
        True,
        identity=False,
    )
    batch_invariant: bool = setting(
        "Batch-invariant kernels: outputs and log-likelihoods bit-identical at any batch size and composition. Off "
        "by default: on CPU the mode runs one intra-op thread (1.1-1.2x the default kernels' time at 1 thread, "
        "1.5-1.6x at 2).",
        False,
    )
    device_map: str | None = setting("Passed to from_pretrained for models too large for one device.", identity=False)
    parallelize: bool = setting(
        "Shard the model over devices (device_map=auto), as lm-eval's hf.", False, identity=False
    )
    revision: str | None = setting("Hub revision of the backbone.", identity=False)
    trust_remote_code: bool = setting("Allow the backbone's own modelling code.", False, identity=False)

    def validate(self) -> None:
        """Raise one ValueError naming the fix for a bad setting (called before any weights load)."""
        resolve_dtype(self.dtype)

    def load_backbone(self, pretrained: str | None, device: Any) -> Backbone:
        """Load one of this method's models with the shared loading settings."""
        device_map = self.device_map or ("auto" if self.parallelize else None)
        return load_backbone(
            pretrained,
            dtype=self.dtype,
            device=device,
            device_map=device_map,
            revision=self.revision,
            trust_remote_code=self.trust_remote_code,
            fast_cpu_kernels=self.fast_cpu_kernels,
            batch_invariant=self.batch_invariant,
        )


@dataclass
class MultiAgentConfig(MethodConfig):
    """Model args of methods with upstream agents."""

    topology: str = setting("sequential or hierarchical.", "sequential")

    def validate(self) -> None:
        super().validate()
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"unknown topology {self.topology!r}; use one of {', '.join(TOPOLOGIES)}")


class Method(ABC):
    """A communication method. Subclasses set the class attributes below, implement `prepare`, and register with
    `@register_method` (`methods/registry.py`).

    Class attributes:
        name: the lm-eval model name (`--model NAME`), also the name in results, reports and `diffmas-train`.
        family: which table of the prompt set its agents use (single_agent, text_mas, latent_mas).
        config_class: its settings dataclass (the model args).
        description: one line for `diffmas-eval models`.
        default_communication: what `communication` means for its main row; reports label other values controls.
        objective: "module:Class" of its training objective for `diffmas-train --method NAME`, or None.
    """

    name: ClassVar[str]
    family: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    description: ClassVar[str] = ""
    default_communication: ClassVar[str] = "none"
    objective: ClassVar[str | None] = None

    def __init__(self, backbone: Backbone, config: MethodConfig | None = None, **settings: Any) -> None:
        """Build the method over an already loaded `backbone` (tests share one); `Method.load` loads it.

        Args:
            config: the method's settings; or give them as keyword arguments (`latent_steps=3`).
        """
        if config is None:
            config = build_settings(self.config_class, settings, what=f"{self.name} setting(s)")
        elif settings:
            config = dataclasses.replace(config, **settings)
        config.validate()
        self.config = config
        self.backbone = backbone
        self.prompts: PromptSet = load_prompt_set(config.prompts)
        self.system_prompt = self.prompts.system if config.system_prompt is None else config.system_prompt
        self.enable_thinking = config.enable_thinking
        self.topology = getattr(config, "topology", None)

    @classmethod
    def load(cls, config: MethodConfig, device: Any = None) -> Method:
        """Validate `config`, load the models it names onto `device` and build the method."""
        config.validate()
        return cls(config.load_backbone(config.pretrained, device), config)

    def backbones(self) -> dict[str, Backbone]:
        """The models this method owns, by role name (their names and fingerprints enter the run identity)."""
        return {"backbone": self.backbone}

    @property
    def upstream_roles(self) -> list[str]:
        """The agents before the final one, in order."""
        return [r for r in self.prompts.roles(self.family, self.topology or "sequential") if r != FINAL_ROLE]

    def render(self, role: str, question: str, transcript: str = "", answer_format: str | None = None) -> list[int]:
        """Token ids of one agent's chat turn, ending with the generation prompt."""
        user = self.prompts.render(
            self.family, self.topology or "sequential", role, question, transcript, answer_format
        )
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

    def final_backbone(self, start: FinalAgentStart) -> Backbone:
        """The model that decodes or scores `start`."""
        return start.backbone or self.backbone

    @contextlib.contextmanager
    def acting_as(self, role: str) -> Iterator[None]:
        """Context in which `role` runs: when the backbone carries one peft adapter per role (named after the role),
        that role's adapter is active. Which parameters require gradients is left as it was (peft's `set_adapter`
        would freeze the other roles' adapters, whose graphs may still wait for their gradients in training)."""
        model = self.backbone.model
        if role in self.role_adapters():
            trainable = {name: p.requires_grad for name, p in model.named_parameters() if "lora_" in name}
            model.set_adapter(role)
            for name, param in model.named_parameters():
                if name in trainable:
                    param.requires_grad_(trainable[name])
        yield

    def role_adapters(self) -> set[str]:
        """Roles that have their own peft adapter on the backbone (empty for a shared adapter or none)."""
        config = getattr(self.backbone.model, "peft_config", None)
        return set(config) - {"default"} if isinstance(config, dict) else set()

    def settings(self) -> dict[str, Any]:
        """Every setting that changes what this method computes (recorded in results; the report's identity)."""
        backbones = self.backbones()
        info: dict[str, Any] = {"method": self.name, **identity_fields(self.config)}
        info["system_prompt"] = self.system_prompt
        info["prompts"] = {"name": self.prompts.name, "sha256": self.prompts.sha256}
        info["backbone"] = self.backbone.name
        info["backbone_fingerprint"] = self.backbone.fingerprint
        if len(backbones) > 1:
            info["backbones"] = {role: {"name": b.name, "fingerprint": b.fingerprint} for role, b in backbones.items()}
        info["dtype"] = str(self.backbone.dtype).removeprefix("torch.")
        info["communication"] = getattr(self.config, "communication", self.default_communication)
        info["batch_invariant"] = all(is_batch_invariant(b.model) for b in backbones.values())
        return info

    @classmethod
    def is_control(cls, identity: dict[str, Any]) -> bool:
        """Whether a run with this identity is a control row (communication removed or swapped) in reports."""
        communication = identity.get("communication")
        return communication not in (None, cls.default_communication)
