"""Methods against independent references: uncached forwards, the alignment solve, chat templating."""

from __future__ import annotations

import pytest
import torch

from diffmas_eval.core.backbone import load_backbone
from diffmas_eval.core.decode import DecodingConfig
from diffmas_eval.core.latent import RIDGE, build_aligner
from diffmas_eval.core.trace import append_prompts
from diffmas_eval.methods import Question, methods
from diffmas_eval.prompts import FINAL_ROLE, load_prompt_set

QUESTIONS = [
    Question("What is 2+2?", "boxed_number", seed=1),
    Question(
        "Tom has 3 apples and buys 5 more apples each day for 4 days. How many apples does he have?",
        "boxed_number",
        seed=2,
    ),
    Question("Which is a force? A. mass B. gravity C. water", "boxed_letter", seed=3),
]
GREEDY = DecodingConfig(max_new_tokens=8)


@pytest.fixture(scope="module")
def backbone(tiny_model_dir):
    return load_backbone(str(tiny_model_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def untied_backbone(tiny_untied_model_dir):
    return load_backbone(str(tiny_untied_model_dir), dtype="float32", device="cpu")


def _judger_last_logits(method, questions):
    """The judger's next-token logits after its prompt, computed through the method's cached trace."""
    with torch.no_grad():
        start = method.prepare(questions, GREEDY)
        _, logits = append_prompts(method.backbone, start.trace, start.prompts, output="logits")
    return logits


def _uncached_reference(method, question, latents_per_agent):
    """One uncached forward over [prompt_1; latents_1; ...; prompt_judger] as inputs_embeds (no cache, no padding)."""
    embed = method.backbone.causal_lm.get_input_embeddings()
    pieces = []
    for agent_index, role in enumerate(method.upstream_roles):
        ids = torch.tensor(method.render(role, question.text))
        pieces.append(embed(ids))
        if latents_per_agent is not None:
            pieces.extend(step[None, :] for step in latents_per_agent[agent_index])
    pieces.append(embed(torch.tensor(method.final_prompt(question))))
    with torch.no_grad():
        return method.backbone.model(inputs_embeds=torch.cat(pieces)[None]).logits[0, -1]


@pytest.mark.parametrize("topology", ["sequential", "hierarchical"])
def test_m0_judger_equals_one_uncached_forward_over_concatenated_prompts(backbone, topology):
    method = methods()["latent-mas"](backbone, topology=topology, latent_steps=0)
    logits = _judger_last_logits(method, QUESTIONS)
    for row, question in enumerate(QUESTIONS):
        ids = [t for role in method.upstream_roles for t in method.render(role, question.text)]
        ids += method.final_prompt(question)
        with torch.no_grad():
            reference = backbone.model(input_ids=torch.tensor([ids])).logits[0, -1]
        assert (logits[row] - reference).abs().max() <= 1e-4


@pytest.mark.parametrize("topology", ["sequential", "hierarchical"])
@pytest.mark.parametrize("realign", [False, True])
def test_latent_steps_equal_uncached_forward_with_recorded_latents(backbone, untied_backbone, topology, realign):
    model = untied_backbone if realign else backbone
    method = methods()["latent-mas"](model, topology=topology, latent_steps=3, realign=realign)
    method.recorded_latents = []
    logits = _judger_last_logits(method, QUESTIONS)
    assert len(method.recorded_latents) == len(method.upstream_roles)
    for row, question in enumerate(QUESTIONS):
        latents = [[step[row] for step in agent] for agent in method.recorded_latents]
        reference = _uncached_reference(method, question, latents)
        assert (logits[row] - reference).abs().max() <= 1e-4


def test_trace_changes_the_judger_and_m0_still_passes_it(backbone):
    alone = _judger_last_logits(methods()["latent-mas"](backbone, communication="none"), QUESTIONS)
    for steps in (0, 2):
        method = methods()["latent-mas"](backbone, latent_steps=steps)
        with torch.no_grad():
            start = method.prepare(QUESTIONS, GREEDY)
        assert all(n > 0 for n in start.trace_tokens())
        logits = _judger_last_logits(method, QUESTIONS)
        shift = (logits.softmax(-1) - alone.softmax(-1)).abs().sum(-1)
        assert (shift > 1e-3).all(), f"trace did not change the judger's distribution at m={steps}"


def test_other_doc_control_uses_another_documents_trace(backbone):
    own = methods()["latent-mas"](backbone, latent_steps=1)
    other = methods()["latent-mas"](backbone, latent_steps=1, communication="other_doc")
    swapped = [
        Question(q.text, q.answer_format, q.seed, trace_text=QUESTIONS[(i + 1) % 3].text)
        for i, q in enumerate(QUESTIONS)
    ]
    with torch.no_grad():
        start_other = other.prepare(swapped, GREEDY)
        start_own = own.prepare([Question(QUESTIONS[1].text)], GREEDY)
    # Row 0 reads the trace built from question 1: same real trace length as question 1's own trace.
    assert start_other.trace_tokens()[0] == start_own.trace_tokens()[0]
    assert start_other.prompts[0] == own.final_prompt(QUESTIONS[0])


def test_alignment_is_identity_for_tied_embeddings(backbone):
    aligner = build_aligner(backbone, realign=True)
    identity = torch.eye(aligner.matrix.shape[0])
    assert (aligner.matrix - identity).abs().max() < 1e-3
    assert aligner.target_norm == pytest.approx(float(backbone.input_embeddings.norm(dim=1).mean()))


def test_alignment_solves_the_ridge_problem_for_untied_embeddings(untied_backbone):
    aligner = build_aligner(untied_backbone, realign=True)
    w_in = untied_backbone.input_embeddings.float()
    w_out = untied_backbone.output_embeddings.float()
    lhs = (w_out.T @ w_out + RIDGE * torch.eye(w_out.shape[1])) @ aligner.matrix
    assert torch.allclose(lhs, w_out.T @ w_in, atol=1e-3, rtol=1e-4)
    assert (aligner.matrix - torch.eye(w_out.shape[1])).abs().max() > 0.1  # a real map, not the identity
    hidden = torch.randn(4, w_in.shape[1])
    aligned = aligner(hidden)
    assert torch.allclose(aligned.norm(dim=-1), torch.full((4,), aligner.target_norm), rtol=1e-5)
    off = build_aligner(untied_backbone, realign=False)
    assert off.matrix is None and torch.allclose(off(hidden).norm(dim=-1), torch.full((4,), off.target_norm))


def test_enable_thinking_reaches_the_qwen3_style_template(backbone):
    think_block = backbone.encode("<think>\n\n</think>\n\n")
    for enable, expect_block in ((False, True), (True, False), (None, False)):
        method = methods()["single-agent"](backbone, enable_thinking=enable)
        ids = method.final_prompt(QUESTIONS[0])
        tail = ids[-len(think_block) :]
        assert (tail == think_block) is expect_block, enable


def test_format_instruction_goes_to_the_final_agent_of_every_method_only(backbone):
    prompts = load_prompt_set()
    instruction = prompts.format_instruction("boxed_number")
    for name in ("single-agent", "text-mas", "latent-mas"):
        method = methods()[name](backbone, **({"max_new_tokens": 4} if name == "text-mas" else {}))
        final_text = backbone.tokenizer.decode(method.final_prompt(QUESTIONS[0]))
        assert instruction in final_text
        for role in method.upstream_roles:
            assert instruction not in backbone.tokenizer.decode(method.render(role, QUESTIONS[0].text))


def test_text_mas_transcript_order_and_content(backbone):
    method = methods()["text-mas"](backbone, max_new_tokens=5)
    with torch.no_grad():
        start = method.prepare(QUESTIONS[:2], GREEDY)
    final_text = backbone.tokenizer.decode(start.prompts[0])
    roles = [call.role for call in start.agents[0]]
    assert roles == ["planner", "critic", "refiner"]
    positions = [final_text.index(f"[{role.title()}]:") for role in roles]
    assert positions == sorted(positions)  # the judger reads the whole transcript, in order
    for call in start.agents[0]:
        assert call.text.strip() in final_text and call.generated_tokens <= 5
    assert FINAL_ROLE not in roles


def test_hierarchical_text_mas_runs_three_independent_solvers(backbone):
    method = methods()["text-mas"](backbone, topology="hierarchical", max_new_tokens=4)
    with torch.no_grad():
        start = method.prepare(QUESTIONS[:2], GREEDY)
    assert [c.role for c in start.agents[1]] == ["math_solver", "science_solver", "code_solver"]


def test_text_mas_runs_each_role_of_a_mixed_batch_under_its_own_adapter(tiny_model_dir, tmp_path):
    """Hierarchical TextMAS decodes its three solvers in one batch; with one adapter per role, every row must be
    decoded under its own role's adapter (compared with each role decoded alone under its adapter, a fresh model)."""
    from diffmas_eval.core.decode import generate
    from diffmas_eval.testing import write_random_adapter

    roles = ["math_solver", "science_solver", "code_solver", "judger"]
    adapter = write_random_adapter(tiny_model_dir, tmp_path / "per_role", per_role=True, roles=roles)
    mixed = methods()["text-mas"](
        load_backbone(str(tiny_model_dir), dtype="float32", device="cpu"),
        topology="hierarchical",
        max_new_tokens=6,
        adapter=str(adapter),
    )
    start = mixed.prepare(QUESTIONS[:2], GREEDY)
    got = {(call.role, row): call.text for row, calls in enumerate(start.agents) for call in calls}
    alone = methods()["text-mas"](
        load_backbone(str(tiny_model_dir), dtype="float32", device="cpu"),
        topology="hierarchical",
        max_new_tokens=6,
        adapter=str(adapter),
    )
    expected = {}
    for role in roles[:3]:
        with torch.no_grad(), alone.acting_as(role):
            prompts = [alone.render(role, q.text) for q in QUESTIONS[:2]]
            outputs = generate(alone.backbone, prompts, None, GREEDY.for_upstream(6), [0, 0])
        expected.update({(role, row): out.text for row, out in enumerate(outputs)})
    assert got == expected
    assert len({got[(role, 0)] for role in roles[:3]}) > 1  # the adapters differ, so the comparison is not vacuous
