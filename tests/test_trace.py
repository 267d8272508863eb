"""KV traces: reserved room is written in place, exactly as `torch.cat` would build it, and never shared by forks;
per-row CPU prefill builds the trace a batched prefill builds."""

from __future__ import annotations

import pytest
import torch

from diffmas_eval.core import trace as trace_module
from diffmas_eval.core.backbone import load_backbone
from diffmas_eval.core.decode import DecodingConfig, generate
from diffmas_eval.core.latent import build_aligner, run_latent_steps
from diffmas_eval.core.score import score_continuations
from diffmas_eval.core.trace import RESERVE_MIN, KVTrace, ReservableLayer, append_prompts, extend_trace

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]


@pytest.fixture(scope="module")
def backbone(tiny_model_dir):
    return load_backbone(str(tiny_model_dir), dtype="float32", device="cpu")


def _trace(backbone) -> KVTrace:
    trace, _ = append_prompts(backbone, None, PROMPTS, output="hidden")
    return trace


def _step(backbone, trace: KVTrace, token: int) -> tuple[KVTrace, torch.Tensor]:
    ids = torch.full((trace.batch_size, 1), token)
    return extend_trace(backbone, trace, torch.ones_like(ids), input_ids=ids, output="logits")


def _storage_positions(layer: ReservableLayer) -> int:
    return layer.keys.untyped_storage().nbytes() // (layer.keys[:, :, :1].numel() * layer.keys.element_size())


@torch.no_grad()
def test_in_place_steps_equal_concatenated_steps(backbone):
    reserved, plain = _trace(backbone), _trace(backbone)
    for step in range(12):
        reserved.reserve(12 - step)
        reserved, reserved_logits = _step(backbone, reserved, 20 + step)
        plain, plain_logits = _step(backbone, plain, 20 + step)
        torch.testing.assert_close(reserved_logits, plain_logits, rtol=0, atol=0)
    for a, b in zip(reserved.cache.layers, plain.cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert all(layer.room() == 0 for layer in reserved.cache.layers)
    # the loop ran to its budget, so no spare position is held
    assert all(_storage_positions(layer) == layer.keys.shape[-2] for layer in reserved.cache.layers)


@torch.no_grad()
def test_generate_is_identical_with_and_without_reserved_room(backbone, monkeypatch):
    config = DecodingConfig(max_new_tokens=20)
    with_room = generate(backbone, PROMPTS, None, config)
    monkeypatch.setattr(KVTrace, "reserve", lambda self, upcoming: None)
    without_room = generate(backbone, PROMPTS, None, config)
    assert [g.token_ids for g in with_room] == [g.token_ids for g in without_room]


@torch.no_grad()
def test_room_grows_in_chunks_and_is_capped_by_the_budget(backbone):
    trace = _trace(backbone)
    layer = trace.cache.layers[0]
    length = layer.keys.shape[-2]
    trace.reserve(10)
    assert layer.room() == 10  # capped by the loop's remaining budget
    pointers = set()
    trace = _trace(backbone)
    layer = trace.cache.layers[0]
    for step in range(300):
        trace.reserve(300 - step)
        trace, _ = _step(backbone, trace, 30)
        pointers.add(layer.keys.data_ptr())
    assert layer.keys.shape[-2] == length + 300
    assert len(pointers) <= -(-300 // RESERVE_MIN)  # one copy per 64 steps (a cat per step without room)


@torch.no_grad()
def test_a_fork_never_sees_or_writes_the_parents_room(backbone):
    parent = _trace(backbone)
    parent.reserve(8)
    fork = parent.fork()
    assert all(layer.room() == 0 for layer in fork.cache.layers)
    before = [layer.keys.clone() for layer in fork.cache.layers]
    parent, _ = _step(backbone, parent, 40)  # written into the parent's room
    fork, fork_logits = _step(backbone, fork, 41)  # concatenated into new storage
    for layer, kept, parent_layer in zip(fork.cache.layers, before, parent.cache.layers, strict=True):
        assert torch.equal(layer.keys[..., :-1, :], kept)
        assert layer.keys.data_ptr() != parent_layer.keys.data_ptr()
        assert not torch.equal(layer.keys[..., -1, :], parent_layer.keys[..., -1, :])
    _, fresh_logits = _step(backbone, _trace(backbone), 41)
    torch.testing.assert_close(fork_logits, fresh_logits, rtol=0, atol=0)


def test_no_room_is_reserved_while_autograd_records(backbone):
    trace = _trace(backbone)
    with torch.enable_grad():
        trace.reserve(16)
    assert all(layer.room() == 0 for layer in trace.cache.layers)


@torch.no_grad()
def test_rows_with_fewer_continuations_score_as_if_alone(backbone):
    """A batch where one row has more options than another scores the extra options on a row-selected fork."""
    continuations = [[[30], [31, 32], [33]], [[34]]]
    batched = score_continuations(backbone, PROMPTS, _trace(backbone), continuations)
    for row, prompt in enumerate(PROMPTS):
        alone_trace, _ = append_prompts(backbone, None, [PROMPTS[row]], output="hidden")
        alone = score_continuations(backbone, [prompt], alone_trace, [continuations[row]])[0]
        for (batched_score, batched_greedy), (alone_score, alone_greedy) in zip(batched[row], alone, strict=True):
            assert batched_score == pytest.approx(alone_score, abs=1e-4) and batched_greedy == alone_greedy


BLOCKS = [PROMPTS, [[30, 31], [32, 33, 34, 35, 36, 37, 38]], [[40, 41, 42], [43]]]


def _appended(backbone, monkeypatch, per_row: bool) -> tuple[KVTrace, list[torch.Tensor]]:
    monkeypatch.setattr(trace_module, "PER_ROW_PREFILL_ON_CPU", per_row)
    trace, outputs = None, []
    for block in BLOCKS:
        trace, hidden = append_prompts(backbone, trace, block, output="hidden")
        outputs.append(hidden)
    return trace, outputs


@torch.no_grad()
def test_per_row_prefill_builds_the_batched_trace(backbone, monkeypatch):
    assert all(trace_module.prefill_per_row(backbone, None, block) for block in BLOCKS)
    per_row, per_row_hidden = _appended(backbone, monkeypatch, per_row=True)
    batched, batched_hidden = _appended(backbone, monkeypatch, per_row=False)
    assert torch.equal(per_row.mask, batched.mask)
    for ours, theirs in zip(per_row_hidden, batched_hidden, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    real = batched.mask.bool()
    for ours, theirs in zip(per_row.cache.layers, batched.cache.layers, strict=True):
        for a, b in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
            torch.testing.assert_close(a.transpose(1, 2)[real], b.transpose(1, 2)[real], rtol=1e-5, atol=1e-5)
    config = DecodingConfig(max_new_tokens=10)
    assert generate(backbone, [[50], [51, 52]], per_row, config) == generate(
        backbone, [[50], [51, 52]], batched, config
    )


def test_per_row_prefill_only_for_padded_cpu_batches_outside_autograd(backbone):
    padded, equal = [[1, 2, 3, 4, 5, 6], [7, 8]], [[1, 2, 3], [4, 5, 6]]
    with torch.no_grad():
        assert trace_module.prefill_per_row(backbone, None, padded)
        assert not trace_module.prefill_per_row(backbone, None, equal)
        assert not trace_module.prefill_per_row(backbone, None, padded[:1])
        # 10% padding: under the threshold, batching still pays
        assert not trace_module.prefill_per_row(backbone, None, [[1] * 10, [2] * 10, [3] * 10, [4] * 10, [5] * 6])
    assert not trace_module.prefill_per_row(backbone, None, padded)  # autograd records: training keeps its batch


def _latent_steps(backbone, trace: KVTrace, steps: int) -> tuple[KVTrace, torch.Tensor]:
    hidden = backbone.input_embeddings[[20, 21]].detach()
    return run_latent_steps(backbone, trace, hidden, steps, build_aligner(backbone, realign=False))


PADDED_BLOCK = [[20, 21, 22, 23], [24]]  # padded enough to be prefilled per row on CPU
# Every core function that extends a trace, each applied to a 2-row trace.
CONSUMERS = {
    "extend_trace": lambda backbone, trace: _step(backbone, trace, 20),
    "append_prompts": lambda backbone, trace: append_prompts(backbone, trace, [[20], [21]]),
    "append_prompts per row": lambda backbone, trace: append_prompts(backbone, trace, PADDED_BLOCK),
    "run_latent_steps": lambda backbone, trace: _latent_steps(backbone, trace, 2),
    "run_latent_steps, 0 steps": lambda backbone, trace: _latent_steps(backbone, trace, 0),
    "generate": lambda backbone, trace: generate(backbone, [[20], [21]], trace, DecodingConfig(max_new_tokens=3)),
    "score_continuations": lambda backbone, trace: score_continuations(backbone, [[20], [21]], trace, [[[30]], [[31]]]),
}


@pytest.mark.parametrize("consumer", CONSUMERS)
@torch.no_grad()
def test_a_trace_handle_cannot_be_read_after_it_is_extended(backbone, consumer):
    """The cache grows in place, so an old handle's mask would be shorter than its cache: every use of it raises."""
    old = _trace(backbone)
    CONSUMERS[consumer](backbone, old)
    uses = [
        lambda trace: trace.cache,
        lambda trace: trace.mask,
        lambda trace: trace.length,
        lambda trace: trace.batch_size,
        KVTrace.real_lengths,
        KVTrace.fork,
        lambda trace: trace.select_rows(torch.tensor([0])),
        lambda trace: trace.reserve(4),
        lambda trace: _step(backbone, trace, 21),
    ]
    for use in uses:
        with pytest.raises(RuntimeError, match="consumed by extend_trace; fork"):
            use(old)


@torch.no_grad()
def test_a_trace_built_from_a_cache_and_a_mask_is_live(backbone):
    """As training builds one from checkpointed tensors."""
    cache, mask = _trace(backbone).consume()
    rebuilt = KVTrace(cache=cache, mask=mask)
    assert rebuilt.length == mask.shape[1] and rebuilt.real_lengths() == [len(p) for p in PROMPTS]
    extended, _ = _step(backbone, rebuilt, 20)
    assert extended.length == mask.shape[1] + 1


@torch.no_grad()
def test_a_fork_keeps_its_length_and_contents_when_the_parent_is_extended(backbone):
    parent = _trace(backbone)
    parent.reserve(8)  # the parent writes its next positions in place, into storage the fork's tensors view
    fork = parent.fork()
    mask = fork.mask.clone()
    keys = [layer.keys.clone() for layer in fork.cache.layers]
    extended, _ = _step(backbone, parent, 40)
    assert trace_module.prefill_per_row(backbone, extended, PADDED_BLOCK)
    extended, _ = append_prompts(backbone, extended, PADDED_BLOCK)  # per row, written into the parent's room
    assert extended.length == mask.shape[1] + 5
    assert fork.length == mask.shape[1] and torch.equal(fork.mask, mask)
    assert fork.real_lengths() == [len(p) for p in PROMPTS]
    for layer, kept in zip(fork.cache.layers, keys, strict=True):
        assert torch.equal(layer.keys, kept)
    _, fork_logits = _step(backbone, fork, 41)
    _, fresh_logits = _step(backbone, _trace(backbone), 41)
    torch.testing.assert_close(fork_logits, fresh_logits, rtol=0, atol=0)
