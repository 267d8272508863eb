"""The lm-eval backends: batching invariance, sampling seeds, scoring shared traces, accounting and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from lm_eval.api.instance import Instance

from diffmas_eval.lm_backend import DiffMASLM, LatentMASLM, SingleAgentLM, backend_class, prompt_hash
from diffmas_eval.methods import Question
from diffmas_eval.testing import write_random_adapter

QUESTIONS = [
    "What is 2+2?",
    "Tom has 3 apples and buys 5 more apples each day for 4 days. How many apples does he have now?",
    "Which is a force? A. mass B. gravity",
    "A train travels 60 miles per hour for 3 hours, then 40 miles per hour for 2 hours. How far did it go?",
    "Is water a cell?",
]
METHOD_CONFIGS = [
    ("single-agent", {}),
    ("text-mas", {"max_new_tokens": 6}),
    ("text-mas", {"max_new_tokens": 6, "topology": "hierarchical"}),
    ("latent-mas", {"latent_steps": 0}),
    ("latent-mas", {"latent_steps": 3}),
    ("latent-mas", {"latent_steps": 2, "topology": "hierarchical", "realign": True}),
    ("diffmas", {"latent_steps": 2}),
    ("diffmas", {"latent_steps": 2, "per_role": True}),
]


def _generate_requests(gen_kwargs, questions=QUESTIONS, answer_format="boxed_number"):
    return [
        Instance("generate_until", {"answer_format": answer_format}, (q, dict(gen_kwargs)), 0, ("toy", i, 1))
        for i, q in enumerate(questions)
    ]


def _mc_requests(questions, choices=("A", "B", "C", "D")):
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


def _make(name, kwargs, tiny_model_dir, adapters, tmp_path, **extra):
    kwargs = dict(kwargs)
    if name == "diffmas":
        kwargs["adapter"] = str(adapters[kwargs.pop("per_role", False)])
    return backend_class(name)(
        pretrained=str(tiny_model_dir),
        dtype="float32",
        device="cpu",
        sidecar=str(tmp_path / "sidecar.jsonl"),
        **kwargs,
        **extra,
    )


def _fresh_run(name, kwargs, tiny_model_dir, adapters, directory, requests, batch_size, seed=1234):
    """Outputs of one fresh backend (its own model load and an empty side-car of its own), asserting nothing was
    reused: each side of an equality test is computed independently."""
    directory.mkdir(parents=True)
    lm = _make(name, kwargs, tiny_model_dir, adapters, directory, batch_size=batch_size, seed=seed)
    outputs = lm.generate_until(requests, disable_tqdm=True)
    totals = lm.get_model_info()["diffmas"]["totals"]
    assert totals.get("reused_requests", 0) == 0 and totals["requests"] == len(requests)
    return outputs


@pytest.mark.parametrize(("name", "kwargs"), METHOD_CONFIGS)
def test_greedy_outputs_identical_at_batch_size_1_and_n(name, kwargs, tiny_model_dir, adapters, tmp_path):
    requests = _generate_requests({"until": [], "max_gen_toks": 10, "do_sample": False})
    one = _fresh_run(name, kwargs, tiny_model_dir, adapters, tmp_path / "b1", requests, 1)
    many = _fresh_run(name, kwargs, tiny_model_dir, adapters, tmp_path / "b4", requests, 4)
    assert one == many
    assert len(set(one)) > 1  # different prompts give different outputs: the comparison is not vacuous


def test_a_second_call_on_one_backend_is_served_from_its_store(tiny_model_dir, adapters, tmp_path):
    """Why the batch tests above build a fresh backend per side: a second call on the same backend reuses results."""
    lm = _make("single-agent", {}, tiny_model_dir, adapters, tmp_path)
    requests = _generate_requests({"until": [], "max_gen_toks": 4})
    lm.generate_until(requests, disable_tqdm=True)
    lm.batch_size = 3
    lm.generate_until(requests, disable_tqdm=True)
    assert lm.get_model_info()["diffmas"]["totals"]["reused_requests"] == len(requests)


@pytest.mark.parametrize(("name", "kwargs"), [METHOD_CONFIGS[0], METHOD_CONFIGS[1], METHOD_CONFIGS[4]])
def test_sampled_outputs_depend_on_seed_not_on_batch(name, kwargs, tiny_model_dir, adapters, tmp_path):
    sampling = {"until": [], "max_gen_toks": 10, "do_sample": True, "temperature": 1.0, "top_p": 0.95}
    requests = _generate_requests(sampling)
    one = _fresh_run(name, kwargs, tiny_model_dir, adapters, tmp_path / "b1", requests, 1)
    many = _fresh_run(name, kwargs, tiny_model_dir, adapters, tmp_path / "b3", requests, 3)
    greedy_requests = _generate_requests({"until": [], "max_gen_toks": 10})
    greedy = _fresh_run(name, kwargs, tiny_model_dir, adapters, tmp_path / "greedy", greedy_requests, 3)
    reseeded = _fresh_run(name, kwargs, tiny_model_dir, adapters, tmp_path / "seed", requests, 3, seed=1235)
    assert one == many
    assert one != greedy
    assert reseeded != one


def test_repeated_sampled_requests_get_different_seeds(tiny_model_dir, adapters, tmp_path):
    lm = _make("single-agent", {}, tiny_model_dir, adapters, tmp_path)
    sampling = {"until": [], "max_gen_toks": 12, "do_sample": True, "temperature": 1.5}
    request = _generate_requests(sampling, QUESTIONS[:1])[0]
    outputs = lm.generate_until([request] * 4, disable_tqdm=True)
    assert len(set(outputs)) > 1
    seeds = [json.loads(line)["seed"] for line in (tmp_path / "sidecar.jsonl").read_text().splitlines()]
    assert len(set(seeds)) == 4


def test_single_agent_matches_lm_eval_hf_backend(tiny_model_dir, adapters, tmp_path):
    from lm_eval.models.huggingface import HFLM

    ours = _make("single-agent", {}, tiny_model_dir, adapters, tmp_path)
    hf = HFLM(pretrained=str(tiny_model_dir), dtype="float32", device="cpu", batch_size=1)
    tokenizer = ours.backbone.tokenizer
    gen_kwargs = {"until": [], "max_gen_toks": 12, "do_sample": False}
    ours_out = ours.generate_until(_generate_requests(gen_kwargs, QUESTIONS[:3], answer_format=None), disable_tqdm=True)
    rendered = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": ours.method.system_prompt}, {"role": "user", "content": q}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for q in QUESTIONS[:3]
    ]
    hf_out = hf.generate_until(
        [Instance("generate_until", {}, (text, dict(gen_kwargs)), 0, ("toy", i, 1)) for i, text in enumerate(rendered)],
        disable_tqdm=True,
    )
    assert ours_out == hf_out


@pytest.mark.parametrize(("name", "kwargs"), [METHOD_CONFIGS[1], METHOD_CONFIGS[4], METHOD_CONFIGS[7]])
def test_loglikelihood_scores_all_continuations_against_one_trace(name, kwargs, tiny_model_dir, adapters, tmp_path):
    lm = _make(name, kwargs, tiny_model_dir, adapters, tmp_path, batch_size=3)
    requests = _mc_requests(QUESTIONS[:3])
    together = lm.loglikelihood(requests, disable_tqdm=True)
    lines = (tmp_path / "sidecar.jsonl").read_text().splitlines()
    assert len(lines) == 3  # upstream work once per context, not once per continuation
    lm.batch_size = 1
    alone = [lm.loglikelihood([r], disable_tqdm=True)[0] for r in requests]
    for (a, greedy_a), (b, greedy_b) in zip(together, alone, strict=True):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
    assert len({round(score, 4) for score, _ in together}) > 3


def test_loglikelihood_is_the_start_of_the_final_reply(tiny_model_dir, adapters, tmp_path):
    lm = _make("single-agent", {}, tiny_model_dir, adapters, tmp_path)
    ((score, _),) = lm.loglikelihood(_mc_requests(QUESTIONS[:1], choices=(" B",)), disable_tqdm=True)
    prompt = lm.method.final_prompt(Question(QUESTIONS[0], "letter"))
    ids = prompt + lm.backbone.encode("B")
    with torch.no_grad():
        logits = lm.backbone.model(input_ids=torch.tensor([ids])).logits[0, -2]
    assert score == pytest.approx(float(torch.log_softmax(logits, -1)[ids[-1]]), abs=1e-4)


def test_latent_trace_changes_scores_and_controls_are_recorded(tiny_model_dir, adapters, tmp_path):
    requests = _mc_requests(QUESTIONS[:2])
    scores = {}
    for communication in ("trace", "none", "other_doc"):
        lm = _make(
            "latent-mas",
            {"latent_steps": 0, "communication": communication},
            tiny_model_dir,
            adapters,
            tmp_path / communication,
            batch_size=2,
        )
        scores[communication] = [s for s, _ in lm.loglikelihood(requests, disable_tqdm=True)]
        assert lm.get_model_info()["diffmas"]["communication"] == communication
    assert scores["trace"] != pytest.approx(scores["none"], abs=1e-3)
    assert scores["other_doc"] != pytest.approx(scores["trace"], abs=1e-3)


def test_model_info_and_sidecar_carry_settings_and_token_counts(tiny_model_dir, adapters, tmp_path):
    lm = _make("text-mas", {"max_new_tokens": 4}, tiny_model_dir, adapters, tmp_path, batch_size=2)
    requests = _generate_requests({"until": [], "max_gen_toks": 6}, QUESTIONS[:2])
    lm.generate_until(requests, disable_tqdm=True)
    info = lm.get_model_info()["diffmas"]
    assert info["method"] == "text-mas" and info["topology"] == "sequential"
    assert info["prompts"]["name"] == "diffmas-v1" and len(info["prompts"]["sha256"]) == 64
    totals = info["totals"]
    assert totals["requests"] == 2 and totals["generated_tokens"] > totals["final_generated_tokens"] > 0
    assert totals["final_stopped"] + totals["final_budget_hit"] == 2
    lines = [json.loads(line) for line in (tmp_path / "sidecar.jsonl").read_text().splitlines()]
    assert {line["prompt_hash"] for line in lines} == {prompt_hash(q) for q in QUESTIONS[:2]}
    assert [a["role"] for a in lines[0]["agents"]] == ["planner", "critic", "refiner"]
    assert all("text" in a for a in lines[0]["agents"])
    assert (
        sum(a["generated_tokens"] for line in lines for a in line["agents"])
        + sum(line["final"]["generated_tokens"] for line in lines)
        == totals["generated_tokens"]
    )


def test_stop_sequences_are_honoured(tiny_model_dir, adapters, tmp_path):
    lm = _make("single-agent", {}, tiny_model_dir, adapters, tmp_path)
    free = lm.generate_until(_generate_requests({"until": [], "max_gen_toks": 16}, QUESTIONS[:1]), disable_tqdm=True)
    stop = free[0][3:5]
    assert stop.strip()
    cut = lm.generate_until(_generate_requests({"until": [stop], "max_gen_toks": 16}, QUESTIONS[:1]), disable_tqdm=True)
    assert cut[0] == free[0][: free[0].index(stop)]


def test_bad_input_fails_before_loading(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ValueError, match="did you mean 'latent_steps'"):
        LatentMASLM(pretrained=missing, latent_step=3)
    with pytest.raises(ValueError, match="given twice"):
        LatentMASLM.create_from_arg_string(f"pretrained={missing},batch_size=2", {"batch_size": 1})
    with pytest.raises(ValueError, match="unknown topology"):
        LatentMASLM(pretrained=missing, topology="star")
    with pytest.raises(ValueError, match="latent_steps must be"):
        LatentMASLM(pretrained=missing, latent_steps=-1)
    with pytest.raises(ValueError, match="unknown communication"):
        LatentMASLM(pretrained=missing, communication="telepathy")
    with pytest.raises(ValueError, match="needs adapter=DIR"):
        DiffMASLM(pretrained=missing)
    with pytest.raises(ValueError, match="batch_size=auto"):
        SingleAgentLM(pretrained=missing, batch_size="auto")
    with pytest.raises(FileNotFoundError, match="directory without config.json"):
        SingleAgentLM(pretrained=str(tmp_path))


def test_adapter_for_another_backbone_is_refused(tiny_untied_model_dir, adapters):
    with pytest.raises(ValueError, match="was trained with backbone"):
        DiffMASLM(pretrained=str(tiny_untied_model_dir), dtype="float32", device="cpu", adapter=str(adapters[False]))


def test_cuda_request_without_cuda_falls_back_to_cpu(tiny_model_dir, adapters, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.warns(UserWarning, match="CUDA is not available"):
        lm = SingleAgentLM(pretrained=str(tiny_model_dir), device="cuda:0", sidecar=str(tmp_path / "s.jsonl"))
    assert lm.backbone.device.type == "cpu"


def test_apply_chat_template_is_refused(tiny_model_dir, adapters, tmp_path):
    lm = _make("single-agent", {}, tiny_model_dir, adapters, tmp_path)
    with pytest.raises(ValueError, match="drop --apply_chat_template"):
        lm.chat_template(True)


def test_diffmas_adapter_changes_outputs_and_per_role_adapters_switch(tiny_model_dir, adapters, tmp_path):
    requests = _mc_requests(QUESTIONS[:2])
    latent = _make("latent-mas", {"latent_steps": 2}, tiny_model_dir, adapters, tmp_path / "l")
    shared = _make("diffmas", {"latent_steps": 2}, tiny_model_dir, adapters, tmp_path / "s")
    per_role = _make("diffmas", {"latent_steps": 2, "per_role": True}, tiny_model_dir, adapters, tmp_path / "p")
    results = [[s for s, _ in lm.loglikelihood(requests, disable_tqdm=True)] for lm in (latent, shared, per_role)]
    assert results[0] != pytest.approx(results[1], abs=1e-3)
    assert results[1] != pytest.approx(results[2], abs=1e-3)
    assert sorted(per_role.backbone.model.peft_config) == ["critic", "judger", "planner", "refiner"]


def test_interrupted_run_resumes_from_the_sidecar_without_redoing_finished_requests(tiny_model_dir, adapters, tmp_path):
    gen_kwargs = {"until": [], "max_gen_toks": 8}
    requests = _generate_requests(gen_kwargs, QUESTIONS[:4])
    full = _make("latent-mas", {"latent_steps": 1}, tiny_model_dir, adapters, tmp_path / "full", batch_size=2)
    expected = full.generate_until(requests, disable_tqdm=True)
    # An interrupted run: one batch finished, the next cut off mid-write.
    sidecar = tmp_path / "run" / "sidecar.jsonl"
    sidecar.parent.mkdir()
    finished = (tmp_path / "full" / "sidecar.jsonl").read_text().splitlines()
    sidecar.write_text("\n".join(finished[:2]) + "\n" + finished[2][:40])
    resumed = _make("latent-mas", {"latent_steps": 1}, tiny_model_dir, adapters, tmp_path / "run", batch_size=2)
    assert resumed.generate_until(requests, disable_tqdm=True) == expected
    info = resumed.get_model_info()["diffmas"]
    assert info["totals"]["reused_requests"] == 2 and info["totals"]["requests"] == 4
    assert info["totals"]["generated_tokens"] == full.get_model_info()["diffmas"]["totals"]["generated_tokens"]
    # Another configuration never reuses these results.
    other = _make("latent-mas", {"latent_steps": 2}, tiny_model_dir, adapters, tmp_path / "run", batch_size=2)
    other.generate_until(requests, disable_tqdm=True)
    assert "reused_requests" not in other.get_model_info()["diffmas"]["totals"]


@pytest.mark.parametrize(
    ("name", "kwargs", "stop"),  # a stop string each that ends some generations early and not others
    [
        ("single-agent", {}, "a"),
        ("text-mas", {"max_new_tokens": 6}, "a"),
        ("latent-mas", {"latent_steps": 1, "communication": "other_doc"}, "e"),
    ],
)
def test_a_raised_budget_recomputes_only_the_generations_the_old_budget_cut_off(
    name, kwargs, stop, tiny_model_dir, adapters, tmp_path
):
    """Greedy generations that ended before the old budget are reused at a new one; they equal a fresh run's."""
    kwargs = {**kwargs, "batch_invariant": True}
    run = tmp_path / "run"
    run.mkdir()

    def finals() -> list[dict]:
        return [json.loads(line)["final"] for line in (run / "sidecar.jsonl").read_text().splitlines()]

    old = _make(name, kwargs, tiny_model_dir, adapters, run, batch_size=2)
    old.generate_until(_generate_requests({"until": [stop], "max_gen_toks": 8}), disable_tqdm=True)
    stopped = sum(f["stopped_before_budget"] for f in finals())
    assert 0 < stopped < len(QUESTIONS)  # some generations ended, others were cut off at 8 tokens
    # Raised, then lowered: at 4 a stored generation serves only when it ended within 3 tokens (the first run's
    # records, one per question, say which).
    short = sum(f["stopped_before_budget"] and f["generated_tokens"] < 4 for f in finals())
    assert short < stopped
    for budget, expected in ((12, stopped), (4, short)):
        requests = _generate_requests({"until": [stop], "max_gen_toks": budget})
        again = _make(name, kwargs, tiny_model_dir, adapters, run, batch_size=2)
        got = again.generate_until(requests, disable_tqdm=True)
        totals = again.get_model_info()["diffmas"]["totals"]
        assert totals.get("rebudgeted_requests", 0) == totals.get("reused_requests", 0) == expected
        fresh = _fresh_run(name, kwargs, tiny_model_dir, adapters, tmp_path / f"fresh-{budget}", requests, 2)
        assert got == fresh
    records = [json.loads(line) for line in (run / "sidecar.jsonl").read_text().splitlines()]
    assert sorted(r["final"]["budget"] for r in records if "rebudgeted_from" in r) == [4] * short + [12] * stopped
    # Without batch-invariant kernels a row's output may depend on its batch: reused across budgets at batch 1 only.
    stock = {k: v for k, v in kwargs.items() if k != "batch_invariant"}
    for batch_size, reused in ((2, False), (1, True)):
        for budget in (8, 16):
            plain = _make(name, stock, tiny_model_dir, adapters, run, batch_size=batch_size)
            plain.generate_until(_generate_requests({"until": [stop], "max_gen_toks": budget}), disable_tqdm=True)
        assert ("rebudgeted_requests" in plain.get_model_info()["diffmas"]["totals"]) is reused


def test_sampled_generations_are_never_reused_across_budgets(tiny_model_dir, adapters, tmp_path):
    """A sampled generation's seed depends on its request, budget included: an early-ended one is not reused."""
    sampled = {"until": ["a"], "do_sample": True, "temperature": 0.7}
    first = _make("single-agent", {"batch_invariant": True}, tiny_model_dir, adapters, tmp_path, batch_size=2)
    first.generate_until(_generate_requests({**sampled, "max_gen_toks": 8}), disable_tqdm=True)
    finals = [json.loads(line)["final"] for line in (tmp_path / "sidecar.jsonl").read_text().splitlines()]
    assert any(f["stopped_before_budget"] for f in finals)  # something a greedy run would have reused
    again = _make("single-agent", {"batch_invariant": True}, tiny_model_dir, adapters, tmp_path, batch_size=2)
    again.generate_until(_generate_requests({**sampled, "max_gen_toks": 16}), disable_tqdm=True)
    assert "reused_requests" not in again.get_model_info()["diffmas"]["totals"]


def test_loglikelihood_resumes_from_the_sidecar(tiny_model_dir, adapters, tmp_path):
    requests = _mc_requests(QUESTIONS[:3])
    first = _make("text-mas", {"max_new_tokens": 3}, tiny_model_dir, adapters, tmp_path, batch_size=3)
    expected = first.loglikelihood(requests, disable_tqdm=True)
    again = _make("text-mas", {"max_new_tokens": 3}, tiny_model_dir, adapters, tmp_path, batch_size=3)
    assert again.loglikelihood(requests, disable_tqdm=True) == [tuple(x) for x in expected]
    assert again.get_model_info()["diffmas"]["totals"]["reused_requests"] == 3


def test_lora_single_agent_control_loads_a_shared_adapter(tiny_model_dir, adapters, tmp_path):
    plain = _make("single-agent", {}, tiny_model_dir, adapters, tmp_path / "a")
    tuned = _make("single-agent", {"adapter": str(adapters[False])}, tiny_model_dir, adapters, tmp_path / "b")
    requests = _mc_requests(QUESTIONS[:2])
    assert plain.loglikelihood(requests, disable_tqdm=True) != tuned.loglikelihood(requests, disable_tqdm=True)
    assert tuned.get_model_info()["diffmas"]["adapter"] == str(adapters[False])
    with pytest.raises(ValueError, match="one adapter per role"):
        _make("single-agent", {"adapter": str(adapters[True])}, tiny_model_dir, adapters, tmp_path / "c")


def test_diffmas_evaluates_as_trained_unless_told_otherwise(tiny_model_dir, adapters, tmp_path):
    import shutil

    adapter = tmp_path / "trained"
    shutil.copytree(adapters[False], adapter)
    config = json.loads((adapter / "manifest.json").read_text())
    (adapter / "manifest.json").write_text(json.dumps({**config, "latent_steps": 3, "realign": True}))
    common = {"pretrained": str(tiny_model_dir), "dtype": "float32", "device": "cpu", "adapter": str(adapter)}
    lm = DiffMASLM(**common, sidecar=str(tmp_path / "a.jsonl"))
    assert lm.method.latent_steps == 3 and lm.method.realign is True
    with pytest.warns(UserWarning, match="trained with latent_steps=3"):
        other = DiffMASLM(**common, latent_steps=1, sidecar=str(tmp_path / "b.jsonl"))
    assert other.method.latent_steps == 1


def test_batches_group_contexts_of_similar_token_length(tiny_model_dir, adapters, tmp_path, monkeypatch):
    lm = _make("latent-mas", {"latent_steps": 0}, tiny_model_dir, adapters, tmp_path)
    # Character length and token length disagree: common words are one token each, rare letter pairs several.
    contexts = ["apples apples apples apples", "zq xj vk wq zq xj", "Name a force.", "What is two plus two?"]
    tokens = lm._token_counts(contexts)
    assert sorted(contexts, key=len) != sorted(contexts, key=tokens.get)
    seen = []
    prepare = lm.method.prepare
    monkeypatch.setattr(
        lm.method, "prepare", lambda questions, decoding: seen.append(questions) or prepare(questions, decoding)
    )
    lm.batch_size = 2
    lm.generate_until(_generate_requests({"until": [], "max_gen_toks": 2}, contexts), disable_tqdm=True)
    by_tokens = sorted(contexts, key=lambda c: -tokens[c])
    assert [[q.text for q in batch] for batch in seen] == [by_tokens[:2], by_tokens[2:]]


def test_cpu_kernels_and_batch_size_are_recorded_and_part_of_the_run_key(tiny_model_dir, adapters, tmp_path):
    (tmp_path / "fast").mkdir(), (tmp_path / "stock").mkdir()  # separate side-cars: nothing is reused
    fast = _make("latent-mas", {"latent_steps": 1}, tiny_model_dir, adapters, tmp_path / "fast")
    stock_args = {"latent_steps": 1, "fast_cpu_kernels": "false"}
    stock = _make("latent-mas", stock_args, tiny_model_dir, adapters, tmp_path / "stock")
    assert fast.get_model_info()["diffmas"]["cpu_kernels"] == "packed"
    assert stock.get_model_info()["diffmas"]["cpu_kernels"] == "stock"
    # 16-bit outputs depend on kernels and batch composition, so a resumed run reuses results only under the same.
    assert fast.run_key() != stock.run_key()
    fast.batch_size = 2
    assert fast.run_key() != fast._run_key
    requests = _generate_requests({"until": [], "max_gen_toks": 8})
    assert fast.generate_until(requests, disable_tqdm=True) == stock.generate_until(requests, disable_tqdm=True)


def test_resume_at_another_limit_never_mixes_other_doc_pairings(tiny_model_dir, adapters, tmp_path):
    """The other_doc partner of a document depends on which documents are in the run, so it is part of the store
    key: a run resumed with more documents recomputes a document whose partner changed."""
    args = {"latent_steps": 1, "communication": "other_doc"}
    requests = _generate_requests({"until": [], "max_gen_toks": 6}, QUESTIONS)
    first = _make("latent-mas", args, tiny_model_dir, adapters, tmp_path)
    first.generate_until(requests[:3], disable_tqdm=True)  # partners 0->1, 1->2, 2->0
    resumed = _make("latent-mas", args, tiny_model_dir, adapters, tmp_path)
    got = resumed.generate_until(requests, disable_tqdm=True)  # partners 0->1, 1->2, 2->3, 3->4, 4->0
    assert resumed.get_model_info()["diffmas"]["totals"]["reused_requests"] == 2
    (tmp_path / "fresh").mkdir()
    assert got == _make("latent-mas", args, tiny_model_dir, adapters, tmp_path / "fresh").generate_until(
        requests, disable_tqdm=True
    )


def test_default_sidecars_of_two_backends_started_together_differ(tiny_model_dir, adapters, monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFMAS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("time.strftime", lambda *_: "20260101-000000")  # the same second
    first = SingleAgentLM(pretrained=str(tiny_model_dir), dtype="float32", device="cpu")
    second = SingleAgentLM(pretrained=str(tiny_model_dir), dtype="float32", device="cpu")
    assert first.sidecar_path != second.sidecar_path
