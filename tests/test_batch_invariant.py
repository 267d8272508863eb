"""The `batch_invariant` model arg: greedy outputs and log-likelihoods bit-identical at any batch size and batch
composition, in 16-bit, for every method; and the kernels it substitutes."""

from __future__ import annotations

import sys

import pytest
import torch
from lm_eval.api.instance import Instance

from diffmas_eval.core import batch_invariant as bi
from diffmas_eval.core.backbone import load_backbone
from diffmas_eval.lm_backend import backend_class
from diffmas_eval.testing import write_random_adapter

QUESTIONS = [
    "What is 2+2?",
    "Tom has 3 apples and buys 5 more apples each day for 4 days. How many apples does he have now?",
    "Which is a force? A. mass B. gravity",
    "A train travels 60 miles per hour for 3 hours, then 40 miles per hour for 2 hours. How far did it go?",
    "Is water a cell?",
    "Each student has 4 books and the class has 23 students. How many books are there in total?",
    "Why do plants need water and energy?",
    "Write a python function that returns the total cost of 7 apples.",
    "How many minutes are in 5 hours?",
]
# Other documents to sit beside QUESTIONS[:3] in a second batch composition.
NEIGHBOURS = [
    "A cell has water. Explain why the cell needs energy, and choose the best option: A. yes B. no",
    "If a book costs 12 dollars, how much do 3 books cost?",
    "What is 7 times 8?",
    "The plant has 9 days of water left and uses 1 each day. How many days are left after 4 days?",
    "Choose the correct answer: which of the following is a force? A. gravity B. apple C. hour D. book",
]
METHOD_CONFIGS = [
    ("single-agent", {}),
    ("text-mas", {"max_new_tokens": 5}),
    ("text-mas", {"max_new_tokens": 5, "topology": "hierarchical"}),
    ("latent-mas", {"latent_steps": 0}),
    ("latent-mas", {"latent_steps": 3}),
    ("latent-mas", {"latent_steps": 2, "topology": "hierarchical", "realign": True}),
    ("diffmas", {"latent_steps": 2}),
    ("diffmas", {"latent_steps": 2, "per_role": True}),
]
GREEDY = {"until": [], "max_gen_toks": 8, "do_sample": False}


def _generate_requests(questions):
    return [
        Instance("generate_until", {"answer_format": "boxed_number"}, (q, dict(GREEDY)), 0, ("toy", i, 1))
        for i, q in enumerate(questions)
    ]


def _mc_requests(questions, choices=(" A", " B gravity", " the answer is 4")):
    return [
        Instance("loglikelihood", {"answer_format": "letter"}, (q, c), k, ("toy_mc", i, 1))
        for i, q in enumerate(questions)
        for k, c in enumerate(choices)
    ]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        False: write_random_adapter(tiny_model_dir, root / "shared"),
        True: write_random_adapter(tiny_model_dir, root / "per_role", per_role=True),
    }


def _fresh_run(name, kwargs, model_dir, adapters, directory, questions, batch_size, *, invariant, dtype="bfloat16"):
    """Greedy outputs and MC log-likelihoods of `questions` from one fresh backend (its own model load and its own
    empty side-car), asserting nothing was reused: each side of a comparison is computed independently."""
    kwargs = dict(kwargs)
    if name == "diffmas":
        kwargs["adapter"] = str(adapters[kwargs.pop("per_role", False)])
    directory.mkdir(parents=True)
    lm = backend_class(name)(
        pretrained=str(model_dir),
        dtype=dtype,
        device="cpu",
        sidecar=str(directory / "sidecar.jsonl"),
        batch_size=batch_size,
        batch_invariant=invariant,
        **kwargs,
    )
    outputs = lm.generate_until(_generate_requests(questions), disable_tqdm=True)
    scores = lm.loglikelihood(_mc_requests(questions), disable_tqdm=True)
    totals = lm.get_model_info()["diffmas"]["totals"]
    assert totals.get("reused_requests", 0) == 0 and totals["requests"] == 2 * len(questions)
    return outputs, scores


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [*METHOD_CONFIGS, ("latent-mas", {"latent_steps": 2, "fast_cpu_kernels": False})],  # linears through `mm`
)
def test_outputs_and_loglikelihoods_identical_at_every_batch_size_and_composition(
    name, kwargs, tiny_model_dir, adapters, tmp_path
):
    runs = {
        size: _fresh_run(name, kwargs, tiny_model_dir, adapters, tmp_path / f"b{size}", QUESTIONS, size, invariant=True)
        for size in (1, 3, 8)
    }
    assert runs[1] == runs[3] == runs[8]  # exact: strings and float log-likelihoods
    outputs, scores = runs[1]
    assert len(set(outputs)) > 1 and len({s for s, _ in scores}) > len(QUESTIONS)  # not a vacuous comparison
    # The first three documents beside other neighbours, in batches of 8.
    mixed = QUESTIONS[:3] + NEIGHBOURS
    other_outputs, other_scores = _fresh_run(
        name, kwargs, tiny_model_dir, adapters, tmp_path / "mixed", mixed, 8, invariant=True
    )
    assert other_outputs[:3] == outputs[:3]
    assert other_scores[:9] == scores[:9]


@pytest.mark.parametrize(("name", "kwargs"), [METHOD_CONFIGS[0], METHOD_CONFIGS[4]])
def test_float16_is_batch_invariant_too(name, kwargs, tiny_model_dir, adapters, tmp_path):
    one = _fresh_run(
        name, kwargs, tiny_model_dir, adapters, tmp_path / "b1", QUESTIONS, 1, invariant=True, dtype="float16"
    )
    many = _fresh_run(
        name, kwargs, tiny_model_dir, adapters, tmp_path / "b8", QUESTIONS, 8, invariant=True, dtype="float16"
    )
    assert one == many


def test_loglikelihoods_change_with_the_batch_when_the_mode_is_off(tiny_model_dir, adapters, tmp_path):
    """The comparison above can fail: with the default kernels the same requests score differently at batch 8, for
    at least one method (which one depends on the CPU's kernels: on an AVX2-only CPU, LatentMAS's bf16 scores
    happened to agree, the single agent's did not)."""
    changed = []
    for number, (name, kwargs) in enumerate([METHOD_CONFIGS[0], METHOD_CONFIGS[4]]):
        _, alone = _fresh_run(
            name, kwargs, tiny_model_dir, adapters, tmp_path / f"{number}-b1", QUESTIONS, 1, invariant=False
        )
        _, together = _fresh_run(
            name, kwargs, tiny_model_dir, adapters, tmp_path / f"{number}-b8", QUESTIONS, 8, invariant=False
        )
        changed.append(alone != together)
        assert [s for s, _ in alone] == pytest.approx(
            [s for s, _ in together], rel=0.01, abs=0.1
        )  # rounding, not a bug
    assert any(changed)


def test_the_mode_is_off_by_default_and_recorded_in_results_and_the_run_key(tiny_model_dir, tmp_path):
    infos = {}
    for invariant in (None, False, True):
        given = {} if invariant is None else {"batch_invariant": invariant}
        lm = backend_class("single-agent")(
            pretrained=str(tiny_model_dir),
            dtype="bfloat16",
            device="cpu",
            sidecar=str(tmp_path / f"{invariant}.jsonl"),
            **given,
        )
        infos[invariant] = lm.get_model_info()["diffmas"]
        assert bi.is_batch_invariant(lm.backbone.model) is (invariant is True)
    assert infos[None]["batch_invariant"] is False and infos[True]["batch_invariant"] is True
    assert infos[None]["run_key"] == infos[False]["run_key"] != infos[True]["run_key"]


# --- the substituted kernels -------------------------------------------------------------------------------------


def _activations(rows: int, features: int, seed: int) -> torch.Tensor:
    """bf16 rows with a few large channels, as real hidden states have (the case where rounding order matters)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=generator)
    x[:, :: max(1, features // 7)] *= 40
    return x.to(torch.bfloat16)


@pytest.mark.parametrize(("out_features", "in_features"), [(576, 576), (1536, 576), (576, 1536)])
def test_linear_rows_do_not_depend_on_their_neighbours(out_features, in_features):
    """Rows standing alone give the same bits alone and among 320 rows; a 40-token sequence gives the same bits alone
    and inside a left- or right-padded block of 3 x 50 rows. (oneDNN's stock kernel changes its blocking between 40
    and 64+ rows and rounds some of these rows differently, so a kernel that ignored the plan would fail this.)"""
    weight = (torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(1)) * 0.05).to(
        torch.bfloat16
    )
    rows = _activations(400, in_features, seed=2)
    linear = torch.nn.functional.linear
    with torch.inference_mode():
        with bi.batch_invariant_kernels():  # rows standing alone: fixed tiles
            alone = torch.cat([linear(rows[i : i + 1], weight) for i in range(40)])
            among = linear(rows[:320], weight)[:40]
            shuffled = linear(torch.cat([rows[300:305], rows[:40]]), weight)[5:]
        assert torch.equal(alone, among) and torch.equal(alone, shuffled)
        sequence = rows[:40]
        with bi.batch_invariant_kernels(bi.BlockPlan.from_block_mask(torch.ones(1, 40))):
            reference = linear(sequence[None], weight)[0]
        block = torch.zeros(3, 50, in_features, dtype=torch.bfloat16)
        block[0, 10:], block[1, :40], block[2] = sequence, sequence, rows[100:150]
        mask = torch.zeros(3, 50)
        mask[0, 10:], mask[1, :40], mask[2] = 1, 1, 1
        with bi.batch_invariant_kernels(bi.BlockPlan.from_block_mask(mask)):
            out = linear(block, weight)
        assert torch.equal(out[0, 10:], reference) and torch.equal(out[1, :40], reference)
        assert not out[0, :10].any()  # pad rows get zeros


def _attention_inputs(keys: int, queries: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 6, queries, 32, generator=generator).to(torch.bfloat16)
    k, v = (torch.randn(1, 2, keys, 32, generator=generator).to(torch.bfloat16) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("queries", [1, 5])
def test_attention_does_not_depend_on_padding_or_neighbours(queries):
    """One row attends to 700 keys (its last `queries` positions causal). The same row left-padded by 330 slots, and
    with 330 pad slots inside its keys (a later agent's padded block), inside a batch of 3, must give the same bits.
    The stock kernel does not (the test can fail)."""
    keys, pad, cut = 700, 330, 350
    q, k, v = _attention_inputs(keys, queries, seed=3)
    causal = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
    other_q, other_k, other_v = _attention_inputs(keys + pad, queries, seed=4)
    noise_k, noise_v = (torch.randn(1, 2, pad, 32).to(torch.bfloat16) for _ in range(2))

    def padded(t, noise, left):
        return torch.cat([noise, t] if left else [t[:, :, :cut], noise, t[:, :, cut:]], dim=2)

    batch_q = torch.cat([q, q, other_q])
    batch_k = torch.cat([padded(k, noise_k, True), padded(k, noise_k, False), other_k])
    batch_v = torch.cat([padded(v, noise_v, True), padded(v, noise_v, False), other_v])
    mask = torch.zeros(3, 1, queries, keys + pad, dtype=torch.bool)
    mask[0, 0, :, pad:], mask[2] = causal, True
    mask[1, 0, :, :cut], mask[1, 0, :, cut + pad :] = causal[:, :cut], causal[:, cut:]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.inference_mode():
        stock_alone = sdpa(q, k, v, attn_mask=causal[None, None], enable_gqa=True)
        stock_batch = sdpa(batch_q, batch_k, batch_v, attn_mask=mask, enable_gqa=True)
        with bi.batch_invariant_kernels():
            alone = sdpa(q, k, v, attn_mask=causal[None, None], enable_gqa=True)
            batched = sdpa(batch_q, batch_k, batch_v, attn_mask=mask, enable_gqa=True)
    assert torch.equal(batched[0], alone[0]) and torch.equal(batched[1], alone[0])
    assert torch.allclose(alone.float(), stock_alone.float(), atol=2e-2)  # the same attention, up to rounding
    assert not (torch.equal(stock_batch[0], stock_alone[0]) and torch.equal(stock_batch[1], stock_alone[0]))


def test_a_backbone_calling_an_uncovered_op_is_refused(tiny_model_dir):
    """A float cumulative sum (as a rotary variant or an MoE router might do) has no batch-invariant kernel: the load
    probe names it instead of letting outputs vary silently."""
    backbone = load_backbone(str(tiny_model_dir), dtype="bfloat16", device="cpu", batch_invariant=True)

    class CumulativeActivation(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(torch.cumsum(x, dim=-1))

    mlp = backbone.decoder.layers[0].mlp
    mlp.act_fn = CumulativeActivation(mlp.act_fn)
    with pytest.raises(NotImplementedError, match=r"aten\.cumsum"):
        bi.check_kernel_coverage(backbone.causal_lm)


def test_training_forwards_keep_the_stock_kernels(tiny_model_dir):
    """Under autograd the mode steps aside: gradients flow through the stock kernels."""
    backbone = load_backbone(str(tiny_model_dir), dtype="float32", device="cpu", batch_invariant=True)
    embeds = backbone.input_embeddings[:5].detach().clone()[None].requires_grad_(True)
    backbone.model(inputs_embeds=embeds).logits.sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


def test_cuda_without_thinking_machines_kernels_gets_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "batch_invariant_ops", None)
    with pytest.raises(ImportError, match="thinking-machines-lab/batch_invariant_ops"):
        bi.batch_invariant_kernels(device_type="cuda").__enter__()
