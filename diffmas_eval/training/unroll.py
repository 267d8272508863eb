"""The DiffMAS training loss: the final agent's next-token loss on the target, conditioned on the latent trace built
in the same forward pass (methods.md §4).

Two formulations, which compute the same numbers:
- single sequence (m = 0, one shared adapter, coupled; and the single-agent baseline): the trace is one causal
  sequence `[p_1; ...; p_{K-1}; x_judger; y]`, so one forward with the loss on `y` gives the coupled gradient;
- unroll (m > 0, per-role adapters, or `frozen_trace`): the upstream agents run one by one exactly as in evaluation
  (`append_prompts` + `run_latent_steps` on a shared KV trace, their adapter active), kept in the autograd graph
  (or under `no_grad` for the frozen-trace ablation); the judger's prompt and target are one block on top.

With `recompute`, each upstream agent's segment is recomputed in the backward pass (`torch.utils.checkpoint` over a
function from the trace's key/value tensors to the extended ones), and the single sequence uses the model's own
gradient checkpointing; both bound activation memory at the cost of a second forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from diffmas_eval.core.backbone import END_OF_TURN_TOKENS, Backbone
from diffmas_eval.core.trace import KVTrace, left_pad, positions_for_block
from diffmas_eval.methods.base import Method, Question
from diffmas_eval.prompts import FINAL_ROLE
from diffmas_eval.training.data import TrainItem


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one training example: each upstream agent's prompt, the judger's prompt, and the target."""

    id: str
    source: str
    upstream: tuple[tuple[int, ...], ...]
    final_prompt: tuple[int, ...]
    target: tuple[int, ...]

    def total_length(self, latent_steps: int) -> int:
        """Positions of the whole example: upstream prompts plus m latent steps each, judger prompt and target."""
        return sum(len(u) + latent_steps for u in self.upstream) + len(self.final_prompt) + len(self.target)


def end_of_turn_id(backbone: Backbone) -> int:
    """The token that ends an assistant turn in the backbone's chat template (e.g. `<|im_end|>`)."""
    vocab = backbone.tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab and vocab[token] in backbone.eos_token_ids:
            return int(vocab[token])
    return min(backbone.eos_token_ids)


def encode_items(backbone: Backbone, method: Method, items: list[TrainItem], append_eos: bool) -> list[EncodedExample]:
    """Render every agent's prompt exactly as evaluation does and tokenize the target as a continuation is scored
    (`encode(target.lstrip())` right after the judger's generation prompt)."""
    eot = [end_of_turn_id(backbone)] if append_eos else []
    encoded = []
    for item in items:
        upstream = tuple(tuple(method.render(role, item.question)) for role in method.upstream_roles)
        final = method.final_prompt(Question(text=item.question, answer_format=item.answer_format))
        target = backbone.encode(item.target.lstrip()) + eot
        if not target:
            raise ValueError(f"training item {item.id} of {item.source} has an empty target; fix or drop it")
        encoded.append(EncodedExample(item.id, item.source, upstream, tuple(final), tuple(target)))
    return encoded


class TraceLoss:
    """Computes the summed target NLL of a batch through the multi-agent trace.

    Args:
        backbone: with its model already wrapped by peft (see `training.lora.attach_lora`).
        method: the LatentMAS (or SingleAgent) instance that rendered the prompts; gives roles and the aligner.
        latent_steps: m.
        per_role: whether each role has its own adapter (switched by name).
        frozen_trace: build the trace under `no_grad`.
        recompute: recompute activations in the backward pass.
    """

    def __init__(
        self,
        backbone: Backbone,
        method: Method,
        *,
        latent_steps: int,
        per_role: bool,
        frozen_trace: bool,
        recompute: bool,
    ) -> None:
        self.backbone = backbone
        self.method = method
        self.latent_steps = latent_steps
        self.per_role = per_role
        self.frozen_trace = frozen_trace
        self.recompute = recompute
        self.roles = [*method.upstream_roles, FINAL_ROLE]
        self.single_sequence = not per_role and not frozen_trace and (latent_steps == 0 or not method.upstream_roles)

    @property
    def formulation(self) -> str:
        return "single_sequence" if self.single_sequence else "unroll"

    def acting_as(self, role: str) -> contextlib.AbstractContextManager[None]:
        """Activate `role`'s adapter through the method (which keeps every role's adapter trainable: an earlier
        role's graph is still waiting for its gradient)."""
        return self.method.acting_as(role)

    def __call__(self, examples: list[EncodedExample]) -> torch.Tensor:
        """Per-example summed negative log-likelihood of the targets, `[B]` float32, differentiable."""
        if self.single_sequence:
            return self._single_sequence(examples)
        return self._unroll(examples)

    # --- formulations ---

    def _single_sequence(self, examples: list[EncodedExample]) -> torch.Tensor:
        sequences = [[t for part in ex.upstream for t in part] + list(ex.final_prompt + ex.target) for ex in examples]
        ids, mask = left_pad(sequences, self.backbone.pad_token_id, self.backbone.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        with self.acting_as(FINAL_ROLE):
            hidden = self.backbone.decoder(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
            ).last_hidden_state
        return self._target_nll(hidden, examples)

    def _unroll(self, examples: list[EncodedExample]) -> torch.Tensor:
        grad_context = torch.no_grad() if self.frozen_trace else contextlib.nullcontext()
        with grad_context:
            trace = self.build_trace(examples)
        blocks = [list(ex.final_prompt + ex.target) for ex in examples]
        ids, block_mask = left_pad(blocks, self.backbone.pad_token_id, self.backbone.device)
        full_mask = block_mask if trace is None else torch.cat([trace.mask, block_mask], dim=1)
        with self.acting_as(FINAL_ROLE):
            hidden = self.backbone.decoder(
                input_ids=ids,
                attention_mask=full_mask,
                position_ids=positions_for_block(full_mask, ids.shape[1]),
                past_key_values=None if trace is None else trace.cache,
                use_cache=trace is not None,
            ).last_hidden_state
        return self._target_nll(hidden, examples)

    def build_trace(self, examples: list[EncodedExample]) -> KVTrace | None:
        """Every upstream agent in turn through the method's own `run_agent` (prefill its prompt on the shared trace,
        then m latent steps, under its adapter), in the autograd graph unless called under `no_grad`."""
        trace: KVTrace | None = None
        for index, role in enumerate(self.method.upstream_roles):
            prompts = [list(ex.upstream[index]) for ex in examples]
            if self.recompute and torch.is_grad_enabled():
                kv = () if trace is None else _flatten_cache(trace.cache)
                mask = None if trace is None else trace.mask
                out = checkpoint(self._agent_segment, role, prompts, mask, *kv, use_reentrant=False)
                trace = KVTrace(cache=self._cache_from(out[1:]), mask=out[0])
            else:
                trace = self.method.run_agent(role, prompts, trace)
        return trace

    def _agent_segment(
        self, role: str, prompts: list[list[int]], mask: torch.Tensor | None, *kv: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """A pure function of the trace tensors, so that `checkpoint` can rerun it in the backward pass."""
        trace = None if mask is None else KVTrace(cache=self._cache_from(kv), mask=mask)
        trace = self.method.run_agent(role, prompts, trace)
        return (trace.mask, *_flatten_cache(trace.cache))

    def _cache_from(self, kv: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> DynamicCache:
        pairs = list(zip(kv[0::2], kv[1::2], strict=True))
        return DynamicCache(ddp_cache_data=pairs, config=self.backbone.causal_lm.config)

    def _target_nll(self, hidden: torch.Tensor, examples: list[EncodedExample]) -> torch.Tensor:
        """Sum of -log p(target) per row from the final hidden states `[B, L, D]` of left-padded blocks ending with
        the target (the LM head runs on the target positions only)."""
        width = hidden.shape[1]
        rows, cols, targets, owner = [], [], [], []
        for row, ex in enumerate(examples):
            n = len(ex.target)
            rows += [row] * n
            cols += list(range(width - n - 1, width - 1))
            targets += list(ex.target)
            owner += [row] * n
        device = hidden.device
        selected = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
        logits = self.backbone.causal_lm.get_output_embeddings()(selected).float()
        token_nll = -torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(targets, device=device)[:, None])
        per_row = torch.zeros(len(examples), dtype=torch.float32, device=device)
        return per_row.index_add(0, torch.tensor(owner, device=device), token_nll.squeeze(-1))


def _flatten_cache(cache: Any) -> tuple[torch.Tensor, ...]:
    return tuple(t for layer in cache.layers for t in (layer.keys, layer.values))
