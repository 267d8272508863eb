"""Interlat (methods.md §6; arXiv 2511.09149): the sender's hidden states as the message.

A sender writes a plan; the last-layer hidden state that predicted each plan token (the end-of-turn token included)
forms the message `H = [h_1 .. h_L]`. A trained adapter (`methods/interlat_adapter.py`) maps `H` into the receiver's
input embeddings, placed between a begin and an end marker where the receiver's template has its message slot:

    inputs_embeds = [emb(prefix) ; begin ; A(H) ; end ; emb(suffix)]

The markers are learned vectors owned by the adapter, not new vocabulary entries: they train with the adapter whether
the receiver is LoRA-tuned or fully fine-tuned, are saved with it, and leave the receiver's tokenizer and embedding
matrix untouched (new token rows in a frozen embedding would never train, and in a tied model would also become
tokens the receiver could emit).

One code path gives the paper's controls (`communication`): `latent` (the adapter over the hidden states), `text`
(the plan's tokens between the markers), `none` (the markers alone), `other_doc` (another question's message).
`compressed=K` replaces the sender's plan by K latents of the trained compression student (stage 2 of
`diffmas-train --method interlat`): K one-position forwards of the sender model instead of a whole plan.

The artefact (`adapter=DIR`) holds the adapter, the receiver's LoRA (or its fully fine-tuned weights), and after
stage 2 the student; its manifest records the receiver's and the sender's weight fingerprints, and another pair of
models is refused.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffmas_eval.artifacts import check_backbones, check_method, read_manifest, weights_fingerprint
from diffmas_eval.core.backbone import Backbone, load_backbone
from diffmas_eval.core.decode import DecodingConfig, _choose_tokens, derive_seed
from diffmas_eval.core.trace import append_prompts, extend_trace
from diffmas_eval.methods.base import AgentCall, FinalAgentStart, Method, MethodConfig, Question
from diffmas_eval.methods.interlat_adapter import (
    ADAPTER_FILE,
    STUDENT_FILE,
    CompressionStudent,
    MessageAdapter,
    load_module,
    student_latents,
)
from diffmas_eval.methods.registry import register_method
from diffmas_eval.prompts import FINAL_ROLE, PromptSet
from diffmas_eval.settings import setting

COMMUNICATION_MODES = ("latent", "text", "none", "other_doc")
FAMILY, TOPOLOGY = "interlat", "sequential"  # the prompt set's table of Interlat's roles
SENDER_ROLE, STUDENT_ROLE = "sender", "student"
# Stands for the message in the receiver's rendered template; the chat text is split there.
MESSAGE_SLOT = "\x00"
RECEIVER_DIR = "receiver"
STUDENT_ADAPTER = "student"  # peft adapter name of the student's LoRA on the sender model
STUDENT_DIR = STUDENT_ADAPTER  # peft saves a named adapter in a subdirectory of that name
MARKER_TEXTS = ("<plan>", "</plan>")  # the markers start as the mean embedding of these texts' tokens
MISSING_ADAPTER = (
    "interlat needs adapter=DIR (a directory written by `diffmas-train --method interlat`): it holds the message "
    "adapter, the markers and the trained receiver"
)


@dataclass
class InterlatConfig(MethodConfig):
    pretrained: str | None = setting(
        "Receiver: the base model the artefact was trained on (hub id, local directory or embedded name).",
        identity=False,
    )
    adapter: str | None = setting(
        "Directory written by `diffmas-train --method interlat` (required): message adapter, markers, receiver.",
        identity=False,
    )
    sender: str | None = setting(
        "Sender model (default: the receiver's base model); must be the one the artefact was trained with.",
        identity=False,
    )
    plan_tokens: int | None = setting("The sender's plan budget in tokens (default: the artefact's training value).")
    communication: str = setting(
        "latent (the adapter over the sender's hidden states); controls: text (the plan's tokens between the "
        "markers), none (markers alone), other_doc (another question's message).",
        "latent",
    )
    compressed: int | None = setting(
        "K: the compression student's K latents instead of the sender's plan (needs a stage-2 artefact)."
    )

    def validate(self) -> None:
        super().validate()
        if not self.adapter:
            raise ValueError(MISSING_ADAPTER)
        if self.communication not in COMMUNICATION_MODES:
            raise ValueError(
                f"unknown communication {self.communication!r}; use one of {', '.join(COMMUNICATION_MODES)}"
            )
        for name in ("plan_tokens", "compressed"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        manifest = read_manifest(self.adapter)
        check_method(manifest, ("interlat",), self.adapter, "--model interlat")
        if self.compressed is not None:
            if self.communication in ("text", "none"):
                raise ValueError(
                    f"compressed={self.compressed} replaces the plan by latents, so communication={self.communication} "
                    "has nothing to compress; use communication=latent or other_doc"
                )
            if "compression" not in manifest:
                raise ValueError(
                    f"compressed={self.compressed} needs a compression student, but {self.adapter} is a stage-1 "
                    "artefact; train one with `diffmas-train --method interlat --stage 2 --stage1 DIR`"
                )


@dataclass(frozen=True)
class ReceiverPrompt:
    """The receiver's rendered chat prompt split at its message slot (token ids before and after the message)."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]

    def token_ids(self, message_length: int, pad_id: int) -> list[int]:
        """The prompt as token ids with `pad_id` standing for the markers and the message (only their count is
        read: the receiver reads the embeddings)."""
        return [*self.prefix, *[pad_id] * (message_length + 2), *self.suffix]


class InterlatPrompts:
    """Renders Interlat's three roles from a prompt set (the `interlat` table): the sender, the compression
    student, and the receiver (the final agent, whose template has a `{transcript}` slot for the message).
    Evaluation and training render through this one class."""

    def __init__(self, prompts: PromptSet, system_prompt: str | None, enable_thinking: bool | None) -> None:
        self.prompts = prompts
        self.system_prompt = prompts.system if system_prompt is None else system_prompt
        self.enable_thinking = enable_thinking

    def _user(self, role: str, question: str, answer_format: str | None = None, slot: str = "") -> str:
        return self.prompts.render(FAMILY, TOPOLOGY, role, question, slot, answer_format)

    def upstream(self, backbone: Backbone, role: str, question: str) -> list[int]:
        """Token ids of the sender's or the student's chat turn, ending with the generation prompt."""
        user = self._user(role, question)
        return backbone.render_chat(user, system=self.system_prompt, enable_thinking=self.enable_thinking)

    def receiver(self, backbone: Backbone, question: str, answer_format: str | None) -> ReceiverPrompt:
        """The receiver's chat turn split where its template puts the message."""
        if MESSAGE_SLOT in question:
            raise ValueError("the question contains a NUL character, which Interlat uses to place the message")
        user = self._user(FINAL_ROLE, question, answer_format, MESSAGE_SLOT)
        if user.count(MESSAGE_SLOT) != 1:
            raise ValueError(
                f"prompt set {self.prompts.name!r}: the interlat judger template needs exactly one {{transcript}} "
                "placeholder (where the message goes)"
            )
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [
            {"role": "user", "content": user}
        ]
        kwargs = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        text = backbone.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        before, _, after = text.partition(MESSAGE_SLOT)
        return ReceiverPrompt(prefix=tuple(backbone.encode(before)), suffix=tuple(backbone.encode(after)))


def receiver_inputs(
    receiver: Backbone, adapter: MessageAdapter, prompt: ReceiverPrompt, message: torch.Tensor
) -> torch.Tensor:
    """The receiver's input embeddings `[len(prefix) + L + 2 + len(suffix), D]` in its dtype:
    `[emb(prefix) ; begin ; message ; end ; emb(suffix)]`, for a message `[L, D]` already in embedding space."""
    embed = receiver.causal_lm.get_input_embeddings()
    device, dtype = receiver.device, receiver.dtype

    def tokens(ids: tuple[int, ...]) -> torch.Tensor:
        return embed(torch.tensor(ids, dtype=torch.long, device=device)).to(dtype)

    pieces = [
        tokens(prompt.prefix),
        adapter.begin_marker[None].to(device, dtype),
        message.to(device, dtype),
        adapter.end_marker[None].to(device, dtype),
        tokens(prompt.suffix),
    ]
    return torch.cat(pieces)


def token_embeddings(backbone: Backbone, ids: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Input embeddings `[len(ids), D]` of token ids (the text message, the plan part of the curriculum)."""
    embed = backbone.causal_lm.get_input_embeddings()
    return embed(torch.tensor(list(ids), dtype=torch.long, device=backbone.device))


def marker_embeddings(backbone: Backbone) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial begin and end markers: the mean input embedding of the tokens of `<plan>` and `</plan>`."""
    return tuple(token_embeddings(backbone, backbone.encode(text)).float().mean(dim=0) for text in MARKER_TEXTS)


@contextlib.contextmanager
def running_with(backbone: Backbone, adapter: str | None) -> Iterator[None]:
    """Context in which `backbone` runs with the peft adapter `adapter` active, or with its base weights (`None`).
    A model without peft adapters runs as it is. Which parameters require gradients is left as it was."""
    model = backbone.model
    if not hasattr(model, "peft_config"):
        yield
        return
    if adapter is None:
        with model.disable_adapter():
            yield
        return
    flags = {name: p.requires_grad for name, p in model.named_parameters() if "lora_" in name}
    previous = model.active_adapter
    model.set_adapter(adapter)
    _restore_flags(model, flags)
    try:
        yield
    finally:
        model.set_adapter(previous)
        _restore_flags(model, flags)


def _restore_flags(model: Any, flags: dict[str, bool]) -> None:
    for name, param in model.named_parameters():
        if name in flags:
            param.requires_grad_(flags[name])


@dataclass
class Plan:
    """The sender's plan for one row.

    Attributes:
        token_ids: the generated tokens (end-of-turn excluded).
        text: their text.
        hidden: `[L, D]`: the last-layer hidden state that predicted each generated token, the end-of-turn token
            included (so `L = len(token_ids) + stopped`).
        stopped: whether the plan ended with end-of-turn before the budget.
    """

    token_ids: list[int]
    text: str
    hidden: torch.Tensor
    stopped: bool


def generate_plan(
    backbone: Backbone, prompts: list[list[int]], decoding: DecodingConfig, seeds: list[int] | None = None
) -> list[Plan]:
    """Decode each row's plan and record the hidden state behind every generated token.

    `h_1` is the last prompt position's final hidden state (it predicts the first token); `h_l` for l > 1 is the
    state at generated token l-1. This is what Hugging Face `generate(output_hidden_states=True)` reports as the last
    layer's last position at each step.

    Args:
        prompts: the sender's rendered chat prompt per row.
        decoding: budget and sampling settings (no stop strings: a plan ends at end-of-turn or the budget).
        seeds: one per row, used only when sampling.
    """
    batch = len(prompts)
    if decoding.sampling and (seeds is None or len(seeds) != batch):
        raise ValueError("sampling needs one seed per row")
    trace, hidden = append_prompts(backbone, None, prompts, output="hidden")
    head = backbone.causal_lm.get_output_embeddings()
    generators = None
    if decoding.sampling:
        generators = [torch.Generator(device=hidden.device).manual_seed(int(s)) for s in seeds]
    tokens: list[list[int]] = [[] for _ in range(batch)]
    states: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    active, stopped = [True] * batch, [False] * batch
    ones = torch.ones((batch, 1), dtype=trace.mask.dtype, device=trace.mask.device)
    budget = decoding.max_new_tokens
    for step in range(budget):
        chosen = _choose_tokens(head(hidden), decoding, generators, active).tolist()
        for row in range(batch):
            if not active[row]:
                continue
            states[row].append(hidden[row])
            if chosen[row] in backbone.eos_token_ids:
                active[row], stopped[row] = False, True
            else:
                tokens[row].append(chosen[row])
        if not any(active) or step == budget - 1:
            break
        trace.reserve(budget - 1 - step)
        feed = torch.tensor(chosen, dtype=torch.long, device=ones.device)[:, None]
        trace, hidden = extend_trace(backbone, trace, ones, input_ids=feed, output="hidden")
    return [
        Plan(tokens[row], backbone.decode(tokens[row]), torch.stack(states[row]), stopped[row]) for row in range(batch)
    ]


@dataclass
class InterlatArtefact:
    """A loaded `diffmas-train --method interlat` directory.

    Attributes:
        receiver: the model that decodes (the base with the receiver's LoRA active, or the fully fine-tuned copy).
        receiver_adapter: the receiver's peft adapter name (None: full fine-tuning, a model of its own).
        adapter: the message adapter and markers.
        student: the compression student's bridge (stage 2), or None.
        manifest: the directory's manifest, with `fingerprint` (of its weight files) added.
    """

    receiver: Backbone
    receiver_adapter: str | None
    adapter: MessageAdapter
    student: CompressionStudent | None
    manifest: dict[str, Any]


def load_artefact(
    directory: str | Path, base: Backbone, sender: Backbone, *, with_student: bool, config: MethodConfig | None = None
) -> InterlatArtefact:
    """Attach an Interlat artefact to the loaded base receiver and sender (refusing other models).

    With LoRA the receiver's adapter is loaded onto `base` in place (adapter `default`); a fully fine-tuned receiver
    is loaded from the directory as a model of its own. With `with_student`, the student's LoRA goes onto `sender`
    (adapter `student`)."""
    from peft import PeftModel

    path = Path(directory).expanduser()
    manifest = read_manifest(path)
    check_method(manifest, ("interlat",), directory, "--model interlat")
    check_backbones(manifest, {"receiver": base, "sender": sender}, directory)
    if manifest["receiver_training"] == "lora":
        base.model = PeftModel.from_pretrained(base.model, str(path / RECEIVER_DIR))
        receiver, receiver_adapter = base, "default"
    else:
        kwargs = {} if config is None else {"dtype": config.dtype, "fast_cpu_kernels": config.fast_cpu_kernels}
        receiver = load_backbone(str(path / RECEIVER_DIR), device=base.device, **kwargs)
        receiver_adapter = None
    adapter = load_module(path / ADAPTER_FILE).to(receiver.device)
    student = None
    if with_student:
        student = load_module(path / STUDENT_FILE).to(sender.device)
        if hasattr(sender.model, "peft_config"):
            sender.model.load_adapter(str(path / STUDENT_DIR), adapter_name=STUDENT_ADAPTER)
        else:
            sender.model = PeftModel.from_pretrained(
                sender.model, str(path / STUDENT_DIR), adapter_name=STUDENT_ADAPTER
            )
    for backbone in (receiver, sender):
        backbone.model.eval()
        backbone.model.requires_grad_(False)
    return InterlatArtefact(
        receiver, receiver_adapter, adapter, student, {**manifest, "fingerprint": weights_fingerprint(path)}
    )


@register_method
class Interlat(Method):
    """Sender -> message (hidden states, text, nothing, another question's, or K compressed latents) -> adapter ->
    receiver, which decodes from `[prefix ; begin ; message ; end ; suffix]` as input embeddings."""

    name = "interlat"
    family = FAMILY
    config_class = InterlatConfig
    description = "Interlat (arXiv 2511.09149): the sender's hidden states through a trained adapter into the receiver"
    default_communication = "latent"
    objective = "diffmas_eval.training.interlat:InterlatObjective"

    def __init__(
        self,
        backbone: Backbone,
        config: InterlatConfig | None = None,
        *,
        sender: Backbone | None = None,
        **settings: Any,
    ) -> None:
        """`backbone` is the receiver's base model; `sender` another loaded model (default: `backbone`, run with its
        base weights)."""
        super().__init__(backbone, config, **settings)
        self.sender = sender or backbone
        artefact = load_artefact(
            self.config.adapter,
            backbone,
            self.sender,
            with_student=self.config.compressed is not None,
            config=self.config,
        )
        self.receiver, self.receiver_adapter = artefact.receiver, artefact.receiver_adapter
        self.adapter, self.student, self.manifest = artefact.adapter, artefact.student, artefact.manifest
        self.plan_tokens = self.config.plan_tokens or int(self.manifest["plan_tokens"])
        self.roles = InterlatPrompts(self.prompts, self.config.system_prompt, self.enable_thinking)
        self._warn_if_not_as_trained()

    @classmethod
    def load(cls, config: InterlatConfig, device: Any = None) -> Interlat:
        config.validate()
        backbone = config.load_backbone(config.pretrained, device)
        sender = None if config.sender in (None, config.pretrained) else config.load_backbone(config.sender, device)
        return cls(backbone, config, sender=sender)

    def _warn_if_not_as_trained(self) -> None:
        trained = {"plan_tokens": self.manifest.get("plan_tokens")}
        if self.config.compressed is not None:
            trained["compressed"] = self.manifest["compression"]["latents"]
        used = {"plan_tokens": self.plan_tokens, "compressed": self.config.compressed}
        for key, value in trained.items():
            if value is not None and used[key] != value:
                warnings.warn(
                    f"{self.config.adapter} was trained with {key}={value} but is evaluated with {key}={used[key]}",
                    stacklevel=3,
                )

    def backbones(self) -> dict[str, Backbone]:
        return {"receiver": self.backbone, "sender": self.sender}

    @property
    def upstream_roles(self) -> list[str]:
        return [STUDENT_ROLE if self.config.compressed is not None else SENDER_ROLE]

    @contextlib.contextmanager
    def acting_as(self, role: str) -> Iterator[None]:
        """The receiver runs with its trained weights, the sender with its base weights, the student with its LoRA."""
        agents = {
            FINAL_ROLE: (self.receiver, self.receiver_adapter),
            SENDER_ROLE: (self.sender, None),
            STUDENT_ROLE: (self.sender, STUDENT_ADAPTER),
        }
        with running_with(*agents[role]):
            yield

    def messages(
        self, questions: list[Question], decoding: DecodingConfig, agents: list[list[AgentCall]]
    ) -> tuple[list[torch.Tensor], list[dict[str, int]]]:
        """Each row's message in the receiver's embedding space `[L, D]` (float32) and its cost."""
        batch = len(questions)
        if self.config.communication == "none":
            empty = torch.zeros((0, self.receiver.input_embeddings.shape[1]), device=self.receiver.device)
            return [empty] * batch, [{"message_length": 0, "sender_tokens": 0, "sender_steps": 0} for _ in questions]
        texts = [q.trace_text if self.config.communication == "other_doc" else q.text for q in questions]
        if any(text is None for text in texts):
            raise ValueError("communication=other_doc needs each question's trace_text (another document)")
        role = self.upstream_roles[0]
        prompts = [self.roles.upstream(self.sender, role, text) for text in texts]
        if self.config.compressed is not None:
            steps = self.config.compressed
            with self.acting_as(STUDENT_ROLE):
                latents = student_latents(self.sender, prompts, self.student, steps)
            spans = self.adapter(list(latents))
            for row, prompt in enumerate(prompts):
                agents[row].append(AgentCall(role=role, prompt_tokens=len(prompt), latent_steps=steps))
            return spans, [{"message_length": steps, "sender_tokens": 0, "sender_steps": steps} for _ in questions]
        seeds = [derive_seed(q.seed, SENDER_ROLE) for q in questions]
        with self.acting_as(SENDER_ROLE):
            plans = generate_plan(self.sender, prompts, decoding.for_upstream(self.plan_tokens), seeds)
        if self.config.communication == "text":
            spans = [token_embeddings(self.receiver, self.receiver.encode(plan.text)).float() for plan in plans]
        else:
            spans = self.adapter([plan.hidden for plan in plans])
        costs = []
        for row, (prompt, plan, span) in enumerate(zip(prompts, plans, spans, strict=True)):
            agents[row].append(
                AgentCall(role=role, prompt_tokens=len(prompt), generated_tokens=len(plan.token_ids), text=plan.text)
            )
            costs.append(
                {
                    "message_length": len(span),
                    "sender_tokens": len(plan.token_ids),
                    "sender_steps": len(plan.hidden) - 1,
                }
            )
        return spans, costs

    def prepare(self, questions: list[Question], decoding: DecodingConfig) -> FinalAgentStart:
        agents: list[list[AgentCall]] = [[] for _ in questions]
        spans, costs = self.messages(questions, decoding, agents)
        prompts = [self.roles.receiver(self.receiver, q.text, q.answer_format) for q in questions]
        embeds = [
            receiver_inputs(self.receiver, self.adapter, prompt, span)
            for prompt, span in zip(prompts, spans, strict=True)
        ]
        return FinalAgentStart(
            prompts=[p.token_ids(len(s), self.receiver.pad_token_id) for p, s in zip(prompts, spans, strict=True)],
            trace=None,
            agents=agents,
            backbone=self.receiver,
            prompt_embeds=embeds,
            extra_cost=costs,
        )

    def settings(self) -> dict[str, Any]:
        manifest = self.manifest
        trained = {key: manifest.get(key) for key in ("stage", "plan_tokens", "receiver_training", "curriculum")}
        if "compression" in manifest:
            trained["latents"] = manifest["compression"]["latents"]
        return {
            **super().settings(),
            "plan_tokens": None if self.config.compressed is not None else self.plan_tokens,
            "adapter": self.config.adapter,
            "adapter_fingerprint": manifest["fingerprint"],
            "adapter_training": trained,
        }
