"""Scoring, written once for every method: log-likelihood of continuations as the start of the final agent's reply."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from diffmas_eval.core.trace import KVTrace, append_prompts

if TYPE_CHECKING:
    from diffmas_eval.core.backbone import Backbone


def score_continuations(
    backbone: Backbone,
    prompts: list[list[int]],
    trace: KVTrace | None,
    continuations: list[list[list[int]]],
    prompt_embeds: list[torch.Tensor] | None = None,
    adapter_names: list[str] | None = None,
) -> list[list[tuple[float, bool]]]:
    """Log-probability of each continuation given the final agent's prompt (and the trace), one prefill per row.

    The prompt is prefilled once on top of the trace (consumed); each round then scores one continuation per row on
    a fork of that state, so a shared trace is never mutated by scoring another continuation against it.

    Args:
        prompts: final agent's rendered prompt per row (ends with its generation prompt).
        trace: working memory per row, or None.
        continuations: per row, the token ids of each candidate continuation.
        prompt_embeds: per row, the prompt as input embeddings `[len(prompt), D]` instead of its token ids' ones.
        adapter_names: per row, the peft adapter it is scored under (a mixed-adapter batch), or None.

    Returns:
        Per row, per continuation: (sum of token log-probs, whether every token is the greedy choice).
    """
    state, last_logits = append_prompts(
        backbone, trace, prompts, output="logits", prompt_embeds=prompt_embeds, adapter_names=adapter_names
    )
    first_logprobs = torch.log_softmax(last_logits.float(), dim=-1)
    results: list[list[tuple[float, bool]]] = [[] for _ in prompts]
    rounds = max((len(c) for c in continuations), default=0)
    for index in range(rounds):
        rows = [r for r, conts in enumerate(continuations) if index < len(conts)]
        conts = [continuations[r][index] for r in rows]
        width = max(len(c) for c in conts)
        if width == 0:
            for r in rows:
                results[r].append((0.0, True))
            continue
        fork = state.fork() if len(rows) == len(prompts) else state.select_rows(torch.tensor(rows))
        ids = torch.full((len(rows), width), backbone.pad_token_id, dtype=torch.long, device=fork.mask.device)
        block_mask = torch.zeros_like(ids)
        for i, cont in enumerate(conts):
            if cont:
                ids[i, : len(cont)] = torch.tensor(cont, device=ids.device)
                block_mask[i, : len(cont)] = 1
        full_mask = torch.cat([fork.mask, block_mask], dim=1)
        # Right padding of the continuations: positions count on from the row's last real position.
        positions = fork.mask.sum(dim=1, keepdim=True) + torch.arange(width, device=ids.device)[None, :]
        mixed = {} if adapter_names is None else {"adapter_names": [adapter_names[r] for r in rows]}
        logits = backbone.model(
            input_ids=ids,
            attention_mask=full_mask,
            position_ids=positions,
            past_key_values=fork.cache,
            use_cache=True,
            **mixed,
        ).logits.float()
        logprobs = torch.cat([first_logprobs[rows][:, None, :], torch.log_softmax(logits[:, :-1], dim=-1)], dim=1)
        for i, (r, cont) in enumerate(zip(rows, conts, strict=True)):
            n = len(cont)
            target = ids[i, :n]
            token_logprobs = logprobs[i, :n].gather(-1, target[:, None]).squeeze(-1)
            greedy = bool((logprobs[i, :n].argmax(dim=-1) == target).all())
            results[r].append((float(token_logprobs.sum()), greedy))
    return results
