"""C2C, Cache-to-Cache (methods.md §5; arXiv 2510.03215): a receiver model answers from its own prompt KV cache with a
sharer model's cache of the same prompt projected and added into it by a trained fuser (`methods/c2c_fuser.py`).

As the reference's `kv_cache_index` does, the prompt is split: every token but the last is prefilled by both models
and fused layer by layer (the trace handed to the final agent), and the last prompt token is the final agent's prompt,
so its query and everything decoded after it read the fused cache. Both models read the same token ids: the sharer
must have the receiver's tokenizer (the reference's cross-tokenizer `TokenAligner` is not implemented; a sharer with
another vocabulary is refused).

The fuser is a directory written by `diffmas-train --method c2c` (`training/c2c.py`); its manifest records both
models' weight fingerprints and a fuser trained for another (receiver, sharer) pair is refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from diffmas_eval.artifacts import (
    check_backbones,
    check_method,
    manifest_backbones,
    read_manifest,
    weights_fingerprint,
)
from diffmas_eval.core.backbone import Backbone, locate_pretrained
from diffmas_eval.core.decode import DecodingConfig
from diffmas_eval.core.trace import KVTrace, ReservableLayer, append_prompts
from diffmas_eval.methods.base import AgentCall, FinalAgentStart, Method, MethodConfig, Question
from diffmas_eval.methods.c2c_fuser import C2CFuser, KVShape, expected_shapes
from diffmas_eval.methods.registry import register_method
from diffmas_eval.settings import setting

COMMUNICATION_MODES = ("fused", "none", "other_doc")
MISSING_FUSER = (
    "c2c needs fuser=DIR (a directory written by `diffmas-train --method c2c`); without a fuser the receiver has no "
    "way to read the sharer's cache (for the receiver alone use --model single-agent)"
)


@dataclass
class C2CConfig(MethodConfig):
    pretrained: str | None = setting(
        "Receiver (the model that answers): hub id, local HF directory or embedded model name (default: the fuser's "
        "receiver).",
        identity=False,
    )
    sharer: str | None = setting(
        "Sharer (whose prompt cache is fused in; same tokenizer as the receiver): hub id, local HF directory or "
        "embedded model name (default: the fuser's sharer).",
        identity=False,
    )
    fuser: str | None = setting(
        "Directory written by `diffmas-train --method c2c` (required; results record its weights' fingerprint).",
        identity=False,
    )
    communication: str = setting(
        "fused; controls: none (the receiver alone through the same code path), other_doc (the sharer reads another "
        "document's prompt).",
        "fused",
    )

    def validate(self) -> None:
        super().validate()
        if self.communication not in COMMUNICATION_MODES:
            raise ValueError(
                f"unknown communication {self.communication!r}; use one of {', '.join(COMMUNICATION_MODES)}"
            )


def check_same_tokenizer(receiver: Any, sharer: Any, receiver_name: str, sharer_name: str) -> None:
    """Refuse a sharer whose vocabulary maps token ids to other tokens than the receiver's (it would read another
    text)."""
    if receiver.get_vocab() != sharer.get_vocab():
        raise ValueError(
            f"the sharer {sharer_name!r} has another tokenizer than the receiver {receiver_name!r}; C2C here needs "
            "both models to read the same token ids (the reference's cross-tokenizer alignment is not implemented): "
            "choose a sharer of the receiver's family, e.g. qwen2.5-coder-1.5b-instruct for "
            "qwen2.5-coder-0.5b-instruct"
        )


def fit_length(tokens: list[int], length: int) -> list[int]:
    """`tokens` cut to `length`, or repeated from its start until `length` (the `other_doc` sharer input must cover
    exactly the receiver's positions)."""
    return [tokens[i % len(tokens)] for i in range(length)]


@register_method
class C2C(Method):
    """The receiver answers from its prompt cache fused with the sharer's (the last prompt token reads the fusion)."""

    name = "c2c"
    family = "single_agent"  # the receiver's prompt is the single agent's: C2C changes only its cache
    config_class = C2CConfig
    description = (
        "C2C (arXiv 2510.03215): a trained fuser projects a sharer model's prompt KV cache into the receiver's"
    )
    default_communication = "fused"
    objective = "diffmas_eval.training.c2c:C2CObjective"

    def __init__(
        self,
        backbone: Backbone,
        config: C2CConfig | None = None,
        *,
        sharer: Backbone,
        fuser: C2CFuser,
        fuser_manifest: dict[str, Any] | None = None,
        **settings: Any,
    ) -> None:
        """`backbone` is the receiver; `fuser` is already built or loaded (`C2C.load` loads and checks it)."""
        super().__init__(backbone, config, **settings)
        check_same_tokenizer(backbone.tokenizer, sharer.tokenizer, backbone.name, sharer.name)
        expected_shapes(KVShape.of(backbone.causal_lm), KVShape.of(sharer.causal_lm), fuser.config, self.config.fuser)
        self.sharer = sharer
        self.fuser = fuser
        self.fuser_manifest = fuser_manifest
        self.communication = self.config.communication

    @classmethod
    def load(cls, config: C2CConfig, device: Any = None) -> C2C:
        """Load receiver, sharer and fuser; refuse another tokenizer before loading weights, and a fuser trained for
        other models by their weight fingerprints."""
        from transformers import AutoTokenizer

        config.validate()
        if not config.fuser:
            raise ValueError(MISSING_FUSER)
        manifest = read_manifest(config.fuser)
        check_method(manifest, ("c2c",), config.fuser, "--model c2c")
        trained = manifest_backbones(manifest)
        names = {
            "receiver": config.pretrained or (trained.get("receiver") or {}).get("name"),
            "sharer": config.sharer or (trained.get("sharer") or {}).get("name"),
        }
        tokenizers = {
            role: AutoTokenizer.from_pretrained(
                locate_pretrained(name)[1], revision=config.revision, trust_remote_code=config.trust_remote_code
            )
            for role, name in names.items()
        }
        check_same_tokenizer(tokenizers["receiver"], tokenizers["sharer"], names["receiver"], names["sharer"])
        models = {role: config.load_backbone(name, device) for role, name in names.items()}
        check_backbones(manifest, models, config.fuser)
        receiver = models["receiver"]
        fuser = C2CFuser.load(config.fuser).to(device=receiver.device, dtype=receiver.dtype)
        fuser_manifest = {**manifest, "fingerprint": weights_fingerprint(config.fuser)}
        return cls(receiver, config, sharer=models["sharer"], fuser=fuser, fuser_manifest=fuser_manifest)

    def backbones(self) -> dict[str, Backbone]:
        return {"receiver": self.backbone, "sharer": self.sharer}

    @property
    def upstream_roles(self) -> list[str]:
        return []

    def fused_trace(
        self, contexts: list[list[int]], sharer_contexts: list[list[int]] | None
    ) -> tuple[KVTrace, list[dict[str, float]]]:
        """The receiver's left-padded cache of `contexts`, fused with the sharer's cache of `sharer_contexts` (same
        lengths; None: not fused, the `none` control).

        The prefills run without gradients (both models are frozen); the fusion runs in the autograd graph when it is
        enabled (training), one row at a time over its real positions, so a row's fused values never depend on the
        batch. Returns the trace and, per row, the fuser's seconds and FLOPs.
        """
        with torch.no_grad():
            trace, _ = append_prompts(self.backbone, None, contexts)
            sharer_trace = None if sharer_contexts is None else append_prompts(self.sharer, None, sharer_contexts)[0]
        cost = [{"fuser_seconds": 0.0, "fuser_flops": 0} for _ in contexts]
        if sharer_trace is None:
            return trace, cost
        lengths = [len(c) for c in contexts]
        if [len(c) for c in sharer_contexts] != lengths:
            raise ValueError("the sharer must read as many tokens as the receiver in every row")
        layers = range(len(self.fuser.layers)) if self.fuser.training else self.fuser.open_layers()
        width = trace.length
        for index in layers:
            receiver_layer = trace.cache.layers[index]
            sharer_layer = sharer_trace.cache.layers[self.fuser.layer_map[index]]
            if type(receiver_layer) not in (DynamicLayer, ReservableLayer):
                raise NotImplementedError(
                    f"C2C fuses full-attention cache layers only; receiver layer {index} is a {type(receiver_layer)}"
                )
            rows_k, rows_v = [], []
            for row, length in enumerate(lengths):
                began = time.perf_counter()
                real = slice(width - length, width)
                key, value = self.fuser.fuse_layer(
                    index,
                    (sharer_layer.keys[row : row + 1, :, real], sharer_layer.values[row : row + 1, :, real]),
                    (receiver_layer.keys[row : row + 1, :, real], receiver_layer.values[row : row + 1, :, real]),
                )
                pads = slice(0, width - length)
                rows_k.append(torch.cat([receiver_layer.keys[row : row + 1, :, pads], key], dim=2))
                rows_v.append(torch.cat([receiver_layer.values[row : row + 1, :, pads], value], dim=2))
                cost[row]["fuser_seconds"] += time.perf_counter() - began
            if isinstance(receiver_layer, ReservableLayer):
                receiver_layer.release_room()
            receiver_layer.keys, receiver_layer.values = torch.cat(rows_k), torch.cat(rows_v)
        if not self.fuser.training:
            for row, length in enumerate(lengths):
                cost[row]["fuser_flops"] = self.fuser.flops_per_token() * length
        return trace, cost

    def prepare(self, questions: list[Question], decoding: DecodingConfig) -> FinalAgentStart:
        prompts = [self.final_prompt(q) for q in questions]
        contexts = [prompt[:-1] for prompt in prompts]
        sharer_contexts = None
        if self.communication == "fused":
            sharer_contexts = contexts
        elif self.communication == "other_doc":
            if any(q.trace_text is None for q in questions):
                raise ValueError("communication=other_doc needs each question's trace_text (another document)")
            others = [self.final_prompt(Question(q.trace_text, q.answer_format))[:-1] for q in questions]
            sharer_contexts = [fit_length(other, len(c)) for other, c in zip(others, contexts, strict=True)]
        trace, cost = self.fused_trace(contexts, sharer_contexts)
        agents = []
        for row, context in enumerate(contexts):
            sharer_tokens = 0 if sharer_contexts is None else len(sharer_contexts[row])
            calls = [AgentCall(role="receiver", prompt_tokens=len(context))]
            if sharer_tokens:
                calls.insert(0, AgentCall(role="sharer", prompt_tokens=sharer_tokens))
            agents.append(calls)
            cost[row] = {"sharer_prompt_tokens": sharer_tokens, **cost[row]}
        return FinalAgentStart(
            prompts=[prompt[-1:] for prompt in prompts],
            trace=trace,
            agents=agents,
            backbone=self.backbone,
            extra_cost=cost,
        )

    def settings(self) -> dict[str, Any]:
        info = super().settings()
        info["sharer"] = self.sharer.name
        info["fuser"] = self.config.fuser
        info["fuser_fingerprint"] = (self.fuser_manifest or {}).get("fingerprint")
        info["fuser_parameters"] = self.fuser.parameter_count()
        info["fuser_open_layers"] = self.fuser.open_layers()
        return info
