"""Decoding, written once for every method: greedy or seeded sampling from a prompt on top of an optional trace."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from diffmas_eval.core.batch_invariant import is_batch_invariant
from diffmas_eval.core.trace import KVTrace, append_prompts

if TYPE_CHECKING:
    from diffmas_eval.core.backbone import Backbone


@dataclass(frozen=True)
class DecodingConfig:
    """How one agent decodes. Greedy unless `do_sample` (temperature 0 also means greedy)."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()

    @property
    def sampling(self) -> bool:
        return self.do_sample and self.temperature > 0

    @classmethod
    def from_gen_kwargs(cls, gen_kwargs: dict[str, Any], default_max_new_tokens: int) -> DecodingConfig:
        """Build from lm-eval generation kwargs (`until`, `max_gen_toks`, `do_sample`, `temperature`, ...).

        Raises:
            ValueError: for a generation kwarg this backend does not implement (rather than silently ignoring it).
        """
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or ()
        stop = (until,) if isinstance(until, str) else tuple(until)
        max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", default_max_new_tokens)))
        temperature = float(kwargs.pop("temperature", 0.0 if not kwargs.get("do_sample") else 1.0))
        do_sample = bool(kwargs.pop("do_sample", temperature > 0))
        top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
        top_k = int(kwargs.pop("top_k", 0) or 0)
        unknown = set(kwargs)
        if unknown:
            raise ValueError(
                f"unsupported generation kwargs {sorted(unknown)}; supported: until, max_gen_toks, "
                "do_sample, temperature, top_p, top_k"
            )
        return cls(
            max_new_tokens=max_new,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop=tuple(s for s in stop if s),
        )

    def for_upstream(self, max_new_tokens: int) -> DecodingConfig:
        """Same sampling settings, the upstream agents' budget, and no task stop strings."""
        return replace(self, max_new_tokens=max_new_tokens, stop=())


@dataclass
class Generation:
    """One agent's output for one row: its tokens (end-of-turn excluded), text, and whether it ended on its own."""

    token_ids: list[int]
    text: str
    stopped_before_budget: bool
    end_token_id: int | None = None  # the end-of-turn token that ended the row (RL trains on it), else None


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts (request text, role, base seed): independent of batch and order."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _choose_tokens(
    logits: torch.Tensor, config: DecodingConfig, generators: list[torch.Generator] | None, active: list[bool]
) -> torch.Tensor:
    """Next token per row from `logits [B, V]`: argmax, or a per-row seeded sample."""
    logits = logits.float()
    if not config.sampling:
        return logits.argmax(dim=-1)
    chosen = logits.argmax(dim=-1)
    for row in range(logits.shape[0]):
        if not active[row]:
            continue
        scores = logits[row] / config.temperature
        if config.top_k > 0:
            kth = torch.topk(scores, min(config.top_k, scores.shape[-1])).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if config.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            probs = sorted_scores.softmax(dim=-1)
            # Nucleus: drop a token once the tokens ranked above it already reach top_p (the first always stays).
            scores[order[(probs.cumsum(dim=-1) - probs) > config.top_p]] = float("-inf")
        chosen[row] = torch.multinomial(scores.softmax(dim=-1), 1, generator=generators[row])[0]
    return chosen


def _first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    hits = [text.find(s) for s in stop if s in text]
    return min(hits) if hits else None


# Committed tokens decoded again with the new ones: a token span can decode differently at the start of a text (a
# SentencePiece leading space is dropped; a byte-level character may have started in an earlier token).
STOP_SCAN_CONTEXT_TOKENS = 4


class _StopScanner:
    """Whether a row's text contains a stop string, decoding a few recent tokens per step instead of the whole row.

    A token's text is committed once the text ends in a complete character (no trailing U+FFFD, which is what an
    unfinished multi-byte character decodes to): the full decode then starts with the committed text and only the
    tokens after it can change. Each step decodes those tokens behind `STOP_SCAN_CONTEXT_TOKENS` committed ones
    and searches their text plus the committed text's last `max(len(stop)) - 1` characters, where any stop string
    not already found must lie.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...]) -> None:
        self.decode = decode
        self.stop = stop
        self.keep = max(len(s) for s in stop) - 1
        self.committed = 0  # tokens whose text is committed
        self.tail = ""  # the last `keep` characters of the committed text

    def scan(self, tokens: list[int]) -> bool:
        """`tokens`: the row so far, one more than at the previous call. Whether its text contains a stop string."""
        start = max(0, self.committed - STOP_SCAN_CONTEXT_TOKENS)
        context = self.decode(tokens[start : self.committed])
        new = self.decode(tokens[start:])[len(context) :]
        recent = self.tail + new
        if not new.endswith("\ufffd"):
            self.committed = len(tokens)
            self.tail = recent[max(0, len(recent) - self.keep) :]
        return any(s in recent for s in self.stop)


def generate(
    backbone: Backbone,
    prompts: list[list[int]],
    trace: KVTrace | None,
    config: DecodingConfig,
    seeds: list[int] | None = None,
    prompt_embeds: list[torch.Tensor] | None = None,
    adapter_names: list[str] | None = None,
    compact: bool | None = None,
) -> list[Generation]:
    """Decode every row from its prompt, prefilled on top of `trace` (consumed: its cache is extended in place).

    Args:
        prompts: the agent's rendered chat prompt per row (token ids, unpadded).
        trace: the working memory each row reads, or None.
        config: budget, stop strings and sampling settings.
        seeds: one seed per row, used only when sampling (a row's sample never depends on the other rows).
        prompt_embeds: per row, the prompt as input embeddings `[len(prompt), D]` instead of its token ids' ones.
        adapter_names: per row, the peft adapter the row runs under (a mixed-adapter batch; `__base__` = none), or
            None for the model's active adapter(s).
        compact: drop rows that have stopped from the running batch (their cache rows, mask and positions), so the
            rows still decoding stop paying for them. None (the default) compacts exactly when the model runs in the
            batch-invariant mode, where a row's output does not depend on its neighbours and compacting cannot change
            any text; elsewhere it would change the rounding of the rows left, so outputs stay as they were.

    Returns:
        One `Generation` per row. Decoding stops at an end-of-turn token, a stop string or the budget.
    """
    batch = len(prompts)
    if config.sampling and (seeds is None or len(seeds) != batch):
        raise ValueError("sampling needs one seed per row")
    trace, logits = append_prompts(
        backbone, trace, prompts, output="logits", prompt_embeds=prompt_embeds, adapter_names=adapter_names
    )
    if compact is None:
        compact = is_batch_invariant(backbone.model)
    mixed = {} if adapter_names is None else {"adapter_names": list(adapter_names)}
    mask = trace.mask
    position = (mask.sum(dim=1, keepdim=True) - 1).clamp(min=0)
    scanners = [_StopScanner(backbone.decode, config.stop) for _ in range(batch)] if config.stop else None
    generators = None
    if config.sampling:
        generators = [torch.Generator(device=logits.device).manual_seed(int(s)) for s in seeds]
    tokens: list[list[int]] = [[] for _ in range(batch)]
    active = [True] * batch
    stopped = [False] * batch
    texts: list[str | None] = [None] * batch
    ended_on: list[int | None] = [None] * batch
    running = list(range(batch))  # the row each position of the running batch decodes (all, until compacted)
    for step in range(config.max_new_tokens):
        chosen = _choose_tokens(
            logits,
            config,
            None if generators is None else [generators[row] for row in running],
            [active[row] for row in running],
        ).tolist()
        for token, row in zip(chosen, running, strict=True):
            if not active[row]:
                continue
            if token in backbone.eos_token_ids:
                active[row], stopped[row], ended_on[row] = False, True, token
                continue
            tokens[row].append(token)
            if scanners is not None and scanners[row].scan(tokens[row]):
                text = backbone.decode(tokens[row])
                cut = _first_stop(text, config.stop)
                if cut is not None:  # always, unless a tokenizer decodes a token span unlike the full text
                    active[row], stopped[row], texts[row] = False, True, text[:cut]
        if not any(active) or step == config.max_new_tokens - 1:
            break
        if compact and not all(active[row] for row in running):
            keep = [i for i, row in enumerate(running) if active[row]]
            index = torch.tensor(keep, dtype=torch.long, device=mask.device)
            trace.cache.batch_select_indices(index)
            mask, position = mask[index], position[index]
            chosen, running = [chosen[i] for i in keep], [running[i] for i in keep]
            if mixed:
                mixed["adapter_names"] = [mixed["adapter_names"][i] for i in keep]
        feed = torch.tensor(chosen, dtype=torch.long, device=mask.device)[:, None]
        trace.reserve(config.max_new_tokens - 1 - step)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        logits = backbone.model(
            input_ids=feed,
            attention_mask=mask,
            position_ids=position,
            past_key_values=trace.cache,
            use_cache=True,
            logits_to_keep=1,
            **mixed,
        ).logits[:, -1]
    return [
        Generation(
            token_ids=tokens[row],
            text=texts[row] if texts[row] is not None else backbone.decode(tokens[row]),
            stopped_before_budget=stopped[row],
            end_token_id=ended_on[row],
        )
        for row in range(batch)
    ]
