"""Stop strings: found by decoding a bounded window per step, with exactly the result of decoding the whole output after
every token (the reference below)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tokenizers import pre_tokenizers

from diffmas_eval.core import decode as decode_module
from diffmas_eval.core.backbone import load_backbone
from diffmas_eval.core.decode import DecodingConfig, generate

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [40, 41]]


@pytest.fixture(scope="module")
def backbone(tiny_model_dir):
    """The tiny model with no end-of-turn token, so that every row runs to its budget unless a stop string ends it."""
    loaded = load_backbone(str(tiny_model_dir), dtype="float32", device="cpu")
    return dataclasses.replace(loaded, eos_token_ids=frozenset())


def _reference(backbone, tokens: list[int], stop: tuple[str, ...]) -> tuple[list[int], str, bool]:
    """What a row decodes to when the whole output is decoded after every token and cut at its first stop string."""
    for count in range(1, len(tokens) + 1):
        text = backbone.decode(tokens[:count])
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            return tokens[:count], text[: min(hits)], True
    return tokens, backbone.decode(tokens), False


def _assert_stops_as_reference(backbone, full: list[list[int]], stops: list[tuple[str, ...]]) -> None:
    """`full`: each row's tokens when nothing stops it (the budget is their length)."""
    for stop in stops:
        generations = generate(backbone, PROMPTS[: len(full)], None, DecodingConfig(len(full[0]), stop=stop))
        for generation, tokens in zip(generations, full, strict=True):
            expected = _reference(backbone, tokens, stop)
            assert (generation.token_ids, generation.text, generation.stopped_before_budget) == expected, stop


def _stop_sets(texts: list[str], places: int) -> list[tuple[str, ...]]:
    """Stop sets that end rows at many places: the i-th holds, from every text, its one to six characters at fraction
    i / places (some span tokens, some hold an unfinished character's U+FFFD); and a set that never occurs."""
    sets = [("never in this text",)]
    for place in range(places):
        length = (1, 2, 3, 6)[place % 4]
        sets.append(tuple(text[place * len(text) // places :][:length] for text in texts))
    return sets


@torch.no_grad()
def test_stop_strings_end_the_tiny_models_generations_as_a_full_re_decode_does(backbone):
    full = [g.token_ids for g in generate(backbone, PROMPTS, None, DecodingConfig(max_new_tokens=30))]
    texts = [backbone.decode(tokens) for tokens in full]
    assert any("\ufffd" in text for text in texts)  # random weights: bytes of unfinished characters in the output
    _assert_stops_as_reference(backbone, full, _stop_sets(texts, places=8))


def _byte_tokens(backbone, text: str) -> list[int]:
    """One token per UTF-8 byte of `text` (the byte-level alphabet), so a character spans several tokens."""
    ((mapped, _),) = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    ids = backbone.tokenizer.convert_tokens_to_ids(list(mapped))
    assert backbone.decode(ids) == text
    return ids


@pytest.mark.parametrize("leading_space_dropped", [False, True])
@torch.no_grad()
def test_characters_split_across_tokens_stop_as_a_full_re_decode_does(backbone, monkeypatch, leading_space_dropped):
    """Multi-byte characters split over tokens, with a skipped special token or a stray byte in between; and a
    tokenizer that drops the text's leading space (as SentencePiece does), so a token decodes differently first."""
    encode = backbone.encode
    special = backbone.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    middle, last = _byte_tokens(backbone, "中")[1:], _byte_tokens(backbone, "文")[2]
    scripted = [
        encode("Total ") + _byte_tokens(backbone, "中")[:1] + [special] + middle + encode(" x\n\n") + [last],
        _byte_tokens(backbone, "ü€ab") + [last, last] + encode("Box ") + _byte_tokens(backbone, "文字") + [special],
        encode(" so the answer") + [special] + encode(" is") + _byte_tokens(backbone, " é") + encode(" the end"),
    ]
    width = max(len(tokens) for tokens in scripted)
    scripted = [tokens + encode(".") * (width - len(tokens)) for tokens in scripted]
    if leading_space_dropped:
        decode = backbone.decode
        monkeypatch.setattr(backbone, "decode", lambda ids: decode(ids).removeprefix(" "))

    def choose_scripted(*args) -> torch.Tensor:
        step = next(steps)
        return torch.tensor([tokens[step] for tokens in scripted])

    monkeypatch.setattr(decode_module, "_choose_tokens", choose_scripted)
    texts = [backbone.decode(tokens) for tokens in scripted]
    stops = [
        *_stop_sets(texts, places=width),
        ("中 x",),
        ("\ufffd\ufffdBox",),
        ("文", "字"),
        ("x\n", "€a"),
        ("ü", " the"),
        (" is é",),
    ]
    for stop in stops:
        steps = iter(range(width))
        _assert_stops_as_reference(backbone, scripted, [stop])


@torch.no_grad()
def test_the_stop_check_decodes_a_bounded_window_per_step(backbone, monkeypatch):
    """Decoding the whole output after every token costs n^2 / 2 decoded tokens; a window costs a constant per step."""
    decoded: list[int] = []
    decode = backbone.decode
    monkeypatch.setattr(backbone, "decode", lambda ids: decoded.append(len(ids)) or decode(ids))
    budget = 300
    config = DecodingConfig(max_new_tokens=budget, stop=("never in this text",))
    generations = generate(backbone, PROMPTS, None, config)
    assert all(len(g.token_ids) == budget for g in generations)
    assert sum(decoded) <= 16 * budget * len(PROMPTS)


def _invariant_backbone(model_dir, dtype: str, adapter=None):
    """A fresh tiny model in the batch-invariant mode, with no end-of-turn token (only stop strings end rows); with
    `adapter`, its per-role LoRA adapters attached (for mixed-adapter batches)."""
    from diffmas_eval.methods.adapter import attach_adapter

    loaded = load_backbone(str(model_dir), dtype=dtype, device="cpu", batch_invariant=True)
    if adapter is not None:
        attach_adapter(loaded, adapter)
    return dataclasses.replace(loaded, eos_token_ids=frozenset())


@pytest.mark.parametrize(
    ("dtype", "sampling", "mixed", "traced"),
    [
        ("float32", False, False, False),
        ("bfloat16", False, False, True),
        ("float32", True, False, False),
        ("bfloat16", True, True, False),
    ],
)
@torch.no_grad()
def test_dropping_stopped_rows_from_the_batch_changes_no_output_in_the_batch_invariant_mode(
    tiny_model_dir, tmp_path, monkeypatch, dtype, sampling, mixed, traced
):
    """Rows that stop at different steps: decoding with them dropped from the running batch (the default in the
    mode) gives every row's tokens and text exactly as keeping the whole batch to the end, each side on its own
    model; `mixed`: each row under its own LoRA adapter (peft's mixed-adapter batches, as NeuroMAS decodes);
    `traced`: on top of a trace of upstream prompts of other lengths (left-padded, as LatentMAS's judger reads)."""
    from transformers import DynamicCache

    from diffmas_eval.core.trace import append_prompts
    from diffmas_eval.testing import write_random_adapter

    selections = []
    select = DynamicCache.batch_select_indices
    monkeypatch.setattr(
        DynamicCache, "batch_select_indices", lambda cache, index: selections.append(len(index)) or select(cache, index)
    )
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [40, 41], [7, 7, 7, 7], [30, 2, 19], [3]]
    seeds = list(range(len(prompts)))
    budget = 24
    adapter = write_random_adapter(tiny_model_dir, tmp_path / "adapter", per_role=True) if mixed else None
    names = None
    if mixed:  # every role's adapter and the base model, interleaved over the rows
        roles = [path.name for path in sorted(adapter.iterdir()) if (path / "adapter_config.json").is_file()]
        assert len(roles) > 1
        names = [([*roles, "__base__"])[row % (len(roles) + 1)] for row in range(len(prompts))]
    upstream = [[9, 8, 7], [20, 21, 22, 23, 24, 25, 26], [4], [50, 51], [60, 61, 62, 63], [70, 71, 72, 73, 74]]

    def trace(backbone):  # a fresh trace each call: generate consumes the one it reads
        return append_prompts(backbone, None, upstream)[0] if traced else None

    kept = _invariant_backbone(tiny_model_dir, dtype, adapter)
    sample = {"do_sample": True, "temperature": 0.9, "top_k": 20} if sampling else {}
    common = {"seeds": seeds, "adapter_names": names}
    full = generate(kept, prompts, trace(kept), DecodingConfig(budget, **sample), compact=False, **common)
    # Each row's own text a little further on each time: the rows stop at different steps, one never.
    stop = tuple(g.text[(i + 1) * len(g.text) // 8 :][:2] for i, g in enumerate(full[:-1]))
    config = DecodingConfig(budget, stop=stop, **sample)
    whole = generate(kept, prompts, trace(kept), config, compact=False, **common)
    assert not selections
    other = _invariant_backbone(tiny_model_dir, dtype, adapter)
    compacted = generate(other, prompts, trace(other), config, **common)

    assert [(g.token_ids, g.text, g.stopped_before_budget) for g in compacted] == [
        (g.token_ids, g.text, g.stopped_before_budget) for g in whole
    ]
    lengths = [len(g.token_ids) for g in whole]
    assert len(set(lengths)) >= 3 and min(lengths) < budget  # rows did stop at different steps
    assert selections and selections == sorted(selections, reverse=True) and selections[-1] < len(prompts)


@torch.no_grad()
def test_stopped_rows_stay_in_the_batch_without_the_batch_invariant_mode(backbone, monkeypatch):
    """Outside the mode, dropping rows would change the rounding of the rows left: the batch is kept whole."""
    from transformers import DynamicCache

    monkeypatch.setattr(DynamicCache, "batch_select_indices", lambda *_: pytest.fail("compacted outside the mode"))
    full = generate(backbone, PROMPTS, None, DecodingConfig(12))
    stop = (full[0].text[2:4],)
    generations = generate(backbone, PROMPTS, None, DecodingConfig(12, stop=stop))
    lengths = [len(g.token_ids) for g in generations]
    assert min(lengths) < max(lengths) == 12  # one row stopped while another ran on: a compaction was due
