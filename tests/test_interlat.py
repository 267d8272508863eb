"""Interlat (issue 14) on the tiny model: the message is the sender's generate-time hidden states, the receiver reads
exactly the embeddings it is given, a zero adapter leaves only the markers, every loss term matches a hand
computation, gradients reach only the declared parameters, batch 1 = batch N, resume is bit-identical, and compressed
inference costs K sender steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lm_eval.api.instance import Instance
from safetensors.torch import load_file

from diffmas_eval.core.backbone import load_backbone
from diffmas_eval.core.decode import DecodingConfig
from diffmas_eval.core.trace import append_prompts
from diffmas_eval.lm_backend import backend_class
from diffmas_eval.methods.base import Question
from diffmas_eval.methods.interlat import (
    RECEIVER_DIR,
    Interlat,
    InterlatPrompts,
    generate_plan,
    receiver_inputs,
    running_with,
)
from diffmas_eval.methods.interlat_adapter import (
    ADAPTER_FILE,
    AdapterShape,
    MessageAdapter,
    load_module,
    student_latents,
)
from diffmas_eval.prompts import load_prompt_set
from diffmas_eval.training import interlat as interlat_training
from diffmas_eval.training.config import build_config
from diffmas_eval.training.data import prepare_items
from diffmas_eval.training.interlat import (
    TERMS_LOG,
    InterlatObjective,
    MessageStore,
    adaptive_weights,
    contrastive_hinge,
    curriculum_span,
    js_divergence,
    mean_pooled_cosine,
    plan_alignment_loss,
    uncertainty_weighted_kl,
    uncertainty_weights,
)
from diffmas_eval.training.trainer import train

ITEMS = [
    {"question": q, "target": f"The answer is \\boxed{{{a}}}.", "answer_format": "boxed_number"}
    for q, a in [
        ("What is 2 + 3?", 5),
        ("Tom has 4 apples and buys 3 more. How many apples?", 7),
        ("A train travels 5 hours at 10 miles each hour. How many miles?", 50),
        ("How many days are in 2 weeks?", 14),
        ("Each book costs 3 dollars. What do 4 books cost?", 12),
        ("A plant has 6 cells and doubles. How many cells?", 12),
    ]
]
QUESTIONS = [Question(it["question"], "boxed_number", seed=i) for i, it in enumerate(ITEMS[:3])]
GREEDY = DecodingConfig(max_new_tokens=6)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DIFFMAS_DATA_DIR", raising=False)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "items.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    return path


def make_config(output: Path, model: Path, data: Path, **overrides):
    settings = {
        "method": "interlat",
        "output_dir": str(output),
        "pretrained": str(model),
        "data": [str(data)],
        "dtype": "float32",
        "device": "cpu",
        "decontaminate": False,
        "max_steps": 2,
        "per_device_batch_size": 2,
        "learning_rate": 1e-2,
        "progress": False,
        "checkpoint_every": 1,
        "plan_tokens": 5,
        "collect_batch_size": 4,
        "adapter_dropout": 0.0,
    }
    return build_config({**settings, **overrides})


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory, tiny_model_dir, data_file) -> Path:
    """A LoRA stage-1 artefact after two training steps (the adapter and LoRA have moved off their init)."""
    return train(make_config(tmp_path_factory.mktemp("stage1") / "run", tiny_model_dir, data_file))


@pytest.fixture(scope="module")
def stage2_dir(tmp_path_factory, tiny_model_dir, data_file, stage1_dir) -> Path:
    """A stage-2 artefact (student with K = 3 latents) over `stage1_dir`."""
    config = make_config(
        tmp_path_factory.mktemp("stage2") / "run", tiny_model_dir, data_file, stage=2, stage1=str(stage1_dir), latents=3
    )
    return train(config)


def fresh(model_dir: Path):
    return load_backbone(str(model_dir), dtype="float32", device="cpu")


def hand_logits(model, embeds: torch.Tensor) -> torch.Tensor:
    """One uncached, unpadded forward over `[n, D]` embeddings: logits `[n, V]`."""
    with torch.no_grad():
        return model(inputs_embeds=embeds[None]).logits[0].float()


# ----------------------------------------------------------------------------------- the message and the receiver


def test_recorded_message_equals_the_hidden_states_of_hf_generate(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    backbone = fresh(tiny_model_dir)
    roles = InterlatPrompts(load_prompt_set(), None, None)
    prompts = [roles.upstream(backbone, "sender", q.text) for q in QUESTIONS]
    with torch.no_grad():
        plans = generate_plan(backbone, prompts, DecodingConfig(max_new_tokens=7))
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    for prompt, plan in zip(prompts, plans, strict=True):
        with torch.no_grad():
            out = reference.generate(
                torch.tensor([prompt]),
                max_new_tokens=7,
                do_sample=False,
                output_hidden_states=True,
                return_dict_in_generate=True,
                pad_token_id=backbone.pad_token_id,
            )
        generated = out.sequences[0, len(prompt) :].tolist()
        states = torch.stack([step[-1][0, -1] for step in out.hidden_states])
        assert generated[: len(plan.token_ids)] == plan.token_ids
        assert len(states) == len(plan.hidden) == len(plan.token_ids) + plan.stopped
        assert (states - plan.hidden).abs().max() <= 1e-5


def _method(model_dir: Path, adapter: Path, **settings) -> Interlat:
    return Interlat(fresh(model_dir), adapter=str(adapter), dtype="float32", **settings)


def test_receiver_logits_equal_one_uncached_forward_over_the_same_embeddings(tiny_model_dir, stage1_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    method = _method(tiny_model_dir, stage1_dir, plan_tokens=5)
    with torch.no_grad():
        start = method.prepare(QUESTIONS, GREEDY)
        with method.acting_as("judger"):
            _, logits = append_prompts(
                start.backbone, None, start.prompts, output="logits", prompt_embeds=start.prompt_embeds
            )
    # Independent side: HF generate for the message, a fresh base + the saved LoRA for the receiver.
    sender = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    receiver = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32), str(stage1_dir / RECEIVER_DIR)
    ).eval()
    adapter = load_module(stage1_dir / ADAPTER_FILE)
    roles = InterlatPrompts(load_prompt_set(), None, None)
    embed = receiver.get_input_embeddings()
    for row, question in enumerate(QUESTIONS):
        prompt = roles.upstream(method.sender, "sender", question.text)
        with torch.no_grad():
            out = sender.generate(
                torch.tensor([prompt]),
                max_new_tokens=5,
                do_sample=False,
                output_hidden_states=True,
                return_dict_in_generate=True,
                pad_token_id=method.sender.pad_token_id,
            )
            message = adapter([torch.stack([step[-1][0, -1] for step in out.hidden_states])])[0]
            split = roles.receiver(method.receiver, question.text, question.answer_format)
            embeds = torch.cat(
                [
                    embed(torch.tensor(split.prefix)),
                    adapter.begin_marker[None],
                    message,
                    adapter.end_marker[None],
                    embed(torch.tensor(split.suffix)),
                ]
            )
        assert start.extra_cost[row]["message_length"] == len(message)
        assert (logits[row] - hand_logits(receiver, embeds)[-1]).abs().max() <= 1e-4


def test_the_receiver_prompt_is_split_where_the_template_puts_the_message(tiny_model_dir):
    backbone = fresh(tiny_model_dir)
    roles = InterlatPrompts(load_prompt_set(), None, None)
    split = roles.receiver(backbone, "What is 2+2?", "boxed_number")
    user = load_prompt_set().render("interlat", "sequential", "judger", "What is 2+2?", "@@MSG@@", "boxed_number")
    text = backbone.tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": user}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert (
        backbone.tokenizer.decode(list(split.prefix)) + "@@MSG@@" + backbone.tokenizer.decode(list(split.suffix))
        == text
    )


def test_zero_adapter_output_leaves_exactly_the_markers_and_zero_vectors(tiny_model_dir, stage1_dir):
    """The equivalence: with `output_scale = 0` the adapter outputs exact zeros, so the receiver reads
    `[prefix; begin; 0 x L; end; suffix]`: the same embeddings for every message of length L (bit-identical logits),
    and the markers-alone input (`communication=none`) with L zero vectors between the markers."""
    method = _method(tiny_model_dir, stage1_dir)
    none = _method(tiny_model_dir, stage1_dir, communication="none")
    with torch.no_grad():
        method.adapter.output_scale.zero_()
        generator = torch.Generator().manual_seed(0)
        messages = [torch.randn(4, 64, generator=generator) * 5 for _ in range(2)]
        spans = method.adapter(messages)
        split = method.roles.receiver(method.receiver, QUESTIONS[0].text, "boxed_number")
        inputs = [receiver_inputs(method.receiver, method.adapter, split, span) for span in spans]
        alone = none.prepare(QUESTIONS[:1], GREEDY).prompt_embeds[0]
        with method.acting_as("judger"):
            logits = [hand_logits(method.receiver.model, row)[-1] for row in inputs]
    assert all(bool((span == 0).all()) for span in spans)
    assert torch.equal(inputs[0], inputs[1]) and torch.equal(logits[0], logits[1])
    begin = len(split.prefix) + 1
    assert torch.equal(torch.cat([alone[:begin], torch.zeros(4, 64), alone[begin:]]), inputs[0])


def test_the_message_changes_the_receiver_and_other_doc_reads_another_questions(tiny_model_dir, stage1_dir):
    latent = _method(tiny_model_dir, stage1_dir)
    none = _method(tiny_model_dir, stage1_dir, communication="none")
    other = _method(tiny_model_dir, stage1_dir, communication="other_doc")
    swapped = [Question(q.text, q.answer_format, q.seed, QUESTIONS[(i + 1) % 3].text) for i, q in enumerate(QUESTIONS)]
    with torch.no_grad():
        own = latent.prepare(QUESTIONS, GREEDY)
        alone = none.prepare(QUESTIONS, GREEDY)
        crossed = other.prepare(swapped, GREEDY)
    begins = [len(latent.roles.receiver(latent.receiver, q.text, q.answer_format).prefix) + 1 for q in QUESTIONS]
    for row in range(3):
        partner = (row + 1) % 3
        length = own.extra_cost[partner]["message_length"]
        assert crossed.extra_cost[row]["message_length"] == length
        crossed_span = crossed.prompt_embeds[row][begins[row] : begins[row] + length]
        assert torch.allclose(
            crossed_span, own.prompt_embeds[partner][begins[partner] : begins[partner] + length], atol=1e-6
        )
        assert not torch.equal(crossed_span, own.prompt_embeds[row][begins[row] : begins[row] + length])
        assert len(alone.prompt_embeds[row]) == len(own.prompt_embeds[row]) - own.extra_cost[row]["message_length"]


def test_adapter_projects_another_senders_width_and_its_zero_output():
    adapter = MessageAdapter(AdapterShape(sender_dim=32, receiver_dim=64, num_heads=4, dropout=0.0)).eval()
    out = adapter([torch.randn(5, 32), torch.randn(2, 32)])
    assert [tuple(o.shape) for o in out] == [(5, 64), (2, 64)] and adapter.input_projection is not None
    rows = [torch.randn(5, 32), torch.randn(2, 32), torch.randn(3, 32)]
    together = adapter(rows)
    assert all(torch.equal(a, adapter([row])[0]) for a, row in zip(together, rows, strict=True))  # rows never mix
    with pytest.raises(ValueError, match="adapter_heads=5 must divide"):
        MessageAdapter(AdapterShape(sender_dim=64, receiver_dim=64, num_heads=5))


# ------------------------------------------------------------------------------------------------------ the losses


def _np_softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _hand_kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True)))


def test_loss_terms_equal_hand_computations():
    generator = torch.Generator().manual_seed(3)
    a, b = torch.randn(3, 7, generator=generator) * 2, torch.randn(3, 7, generator=generator) * 2
    pa, pb = _np_softmax(a.double().numpy()), _np_softmax(b.double().numpy())
    kl = np.mean([_hand_kl(pb[t], pa[t]) for t in range(3)])
    cos = (pa.ravel() @ pb.ravel()) / (np.linalg.norm(pa) * np.linalg.norm(pb))
    assert float(plan_alignment_loss(a, b)) == pytest.approx(0.7 * kl + 0.3 * (1 - cos), abs=1e-5)
    js = np.mean(
        [0.5 * _hand_kl(pa[t], (pa[t] + pb[t]) / 2) + 0.5 * _hand_kl(pb[t], (pa[t] + pb[t]) / 2) for t in range(3)]
    )
    assert float(js_divergence(a, b)) == pytest.approx(js, abs=1e-6)
    assert float(contrastive_hinge(a, b)) == pytest.approx(max(0.0, 0.69 - js), abs=1e-6)
    assert float(contrastive_hinge(a, a)) == pytest.approx(0.69, abs=1e-6)
    assert adaptive_weights(2.0, 0.345) == pytest.approx((0.03, 0.255))
    assert adaptive_weights(10.0, 5.0) == pytest.approx((0.05, 0.5))
    assert adaptive_weights(-1.0, 0.0) == pytest.approx((0.01, 0.01))

    hidden, plan = torch.arange(10.0).reshape(5, 2), -torch.arange(8.0).reshape(4, 2)
    mixed = curriculum_span(hidden, plan, 0.3)  # round(1.5) = 2 hidden states, then the plan after round(1.2) = 1
    assert torch.equal(mixed, torch.cat([hidden[:2], plan[1:]]))
    assert torch.equal(curriculum_span(hidden, plan, 1.0), hidden)

    h_none = torch.tensor([2.0, 1.0, 3.0, 0.5, 4.0])
    h_full = torch.tensor([1.0, 2.0, 0.0, 0.5, 1.0])
    raw = np.maximum(h_none.numpy() - h_full.numpy(), 0)  # [1, 0, 3, 0, 3]
    cap = np.quantile(raw[raw > 0], 0.95)
    expected = np.minimum(raw, cap) / np.minimum(raw, cap).mean()
    weights = uncertainty_weights(h_none, h_full)
    assert weights.numpy() == pytest.approx(expected, abs=1e-6)
    long = uncertainty_weights(torch.full((70,), 2.0), torch.ones(70))
    assert bool((long[64:] == 0).all()) and bool((long[:64] > 0).all())
    t, s = torch.randn(5, 7, generator=generator), torch.randn(5, 7, generator=generator)
    pt, ps = _np_softmax(t.double().numpy() / 4), _np_softmax(s.double().numpy() / 4)
    per_token = [16 * _hand_kl(pt[i], ps[i]) for i in range(5)]
    assert float(uncertainty_weighted_kl(t, s, weights)) == pytest.approx(
        float(np.dot(expected, per_token) / (expected.sum() + 1e-6)), abs=1e-4
    )
    x, y = torch.randn(3, 4, generator=generator), torch.randn(6, 4, generator=generator)
    mx, my = x.numpy().mean(0), y.numpy().mean(0)
    assert float(mean_pooled_cosine(x, y)) == pytest.approx(
        1 - mx @ my / (np.linalg.norm(mx) * np.linalg.norm(my)), abs=1e-6
    )


def _objective(tmp_path: Path, model_dir: Path, data_file: Path, **overrides) -> InterlatObjective:
    config = make_config(tmp_path / "out", model_dir, data_file, **overrides)
    objective = InterlatObjective(config, "cpu")
    items, _ = prepare_items(config.data, None, None, decontaminate_items=False, max_items=None, seed=0)
    objective.encode(items)
    objective.trainable()
    return objective


def test_stage1_terms_of_a_batch_equal_a_hand_computation(tmp_path, tiny_model_dir, data_file):
    objective = _objective(tmp_path, tiny_model_dir, data_file)
    objective.train_mode()
    with torch.no_grad():  # a LoRA at init is a no-op: move it so the receiver's weights matter
        for name, param in objective.trainable():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    objective.on_step(3, 10)
    batch = objective.examples[:2]
    with torch.no_grad():
        terms = objective.stage1_terms(batch)
        receiver, adapter = objective.receiver, objective.adapter
        embed = receiver.causal_lm.get_input_embeddings()
        with running_with(receiver, objective.receiver_adapter):
            for row, ex in enumerate(batch):
                ratio = objective.mix_ratio(ex)
                plan = embed(torch.tensor(ex.plan, dtype=torch.long))
                negative = objective.negative(ex).message
                tiled = torch.cat([negative] * (len(ex.message) // len(negative) + 1))[: len(ex.message)]

                def logits(span, ex=ex):
                    rows = [
                        embed(torch.tensor(ex.receiver.prefix)),
                        adapter.begin_marker[None],
                        span,
                        adapter.end_marker[None],
                        embed(torch.tensor(ex.receiver.suffix)),
                        embed(torch.tensor(ex.target)),
                    ]
                    out = hand_logits(receiver.model, torch.cat(rows))
                    return out[len(out) - len(ex.target) - 1 : -1].double().numpy()

                def mix(message, ratio=ratio, plan=plan):
                    adapted = adapter([message])[0]
                    return torch.cat([adapted[: round(len(adapted) * ratio)], plan[round(len(plan) * ratio) :]])

                lat, txt, neg = logits(mix(ex.message)), logits(plan), logits(mix(tiled))
                p_lat, p_txt, p_neg = _np_softmax(lat), _np_softmax(txt), _np_softmax(neg)
                ce = -np.mean([math.log(p_lat[t][tok]) for t, tok in enumerate(ex.target)])
                kl = np.mean([_hand_kl(p_txt[t], p_lat[t]) for t in range(len(ex.target))])
                cos = (p_lat.ravel() @ p_txt.ravel()) / (np.linalg.norm(p_lat) * np.linalg.norm(p_txt))
                plan_term = 0.7 * kl + 0.3 * (1 - cos)
                js = np.mean(
                    [
                        0.5 * _hand_kl(p_lat[t], (p_lat[t] + p_neg[t]) / 2)
                        + 0.5 * _hand_kl(p_neg[t], (p_lat[t] + p_neg[t]) / 2)
                        for t in range(len(ex.target))
                    ]
                )
                contrast = max(0.0, 0.69 - js)
                w_plan = 0.01 + 0.04 * min(max(plan_term / 4, 0), 1)
                w_contrast = 0.01 + 0.49 * min(max(contrast / 0.69, 0), 1)
                assert float(terms["ce"][row]) == pytest.approx(ce, abs=1e-4)
                assert float(terms["plan"][row]) == pytest.approx(plan_term, abs=1e-4)
                assert float(terms["contrast"][row]) == pytest.approx(contrast, abs=1e-4)
                assert float(terms["total"][row]) == pytest.approx(
                    ce + w_plan * plan_term + w_contrast * contrast, abs=1e-4
                )
    assert {objective.mix_ratio(ex) for ex in objective.examples} <= set(interlat_training.CURRICULUM_RATIOS)


def test_student_latents_equal_one_uncached_forward_and_stage2_terms_a_hand_computation(
    tmp_path, tiny_model_dir, data_file, stage1_dir
):
    objective = _objective(tmp_path, tiny_model_dir, data_file, stage=2, stage1=str(stage1_dir), latents=3)
    with torch.no_grad():  # a fresh student LoRA is a no-op: move it
        for name, param in objective.trainable():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    batch = objective.examples[:2]
    sender, student, adapter, receiver = objective.sender, objective.student, objective.adapter, objective.receiver
    with torch.no_grad():
        terms = objective.stage2_terms(batch)
        with running_with(sender, "student"):
            latents = student_latents(sender, [list(ex.student_prompt) for ex in batch], student, 3)
            embed = sender.causal_lm.get_input_embeddings()
            for row, ex in enumerate(batch):  # teacher-forced: [prompt; start; h2e(z_1); h2e(z_2)] in one forward
                steps = [student.start[None], student.h2e(latents[row, :2])]
                inputs = torch.cat([embed(torch.tensor(ex.student_prompt)), *steps])
                hidden = sender.decoder(inputs_embeds=inputs[None]).last_hidden_state[0, -3:]
                assert (hidden - latents[row]).abs().max() <= 1e-4
        with running_with(receiver, objective.receiver_adapter):
            rembed = receiver.causal_lm.get_input_embeddings()
            for row, ex in enumerate(batch):

                def logits(span, ex=ex):
                    rows = [
                        rembed(torch.tensor(ex.receiver.prefix)),
                        adapter.begin_marker[None],
                        span,
                        adapter.end_marker[None],
                        rembed(torch.tensor(ex.receiver.suffix)),
                        rembed(torch.tensor(ex.target)),
                    ]
                    out = hand_logits(receiver.model, torch.cat(rows))
                    return out[len(out) - len(ex.target) - 1 : -1].double().numpy()

                student_span, data_span = adapter([latents[row]])[0], adapter([ex.message])[0]
                s_logits, t_logits, n_logits = logits(student_span), logits(data_span), logits(data_span[:0])
                p_s = _np_softmax(s_logits)
                ce = -np.mean([math.log(p_s[t][tok]) for t, tok in enumerate(ex.target)])
                ent = [-(p * np.log(p)).sum(-1) for p in (_np_softmax(n_logits), _np_softmax(t_logits))]
                raw = np.maximum(ent[0] - ent[1], 0)
                if (raw > 0).any():
                    raw = np.minimum(raw, np.quantile(raw[raw > 0], 0.95))
                w = raw / max(raw.mean(), 1e-6)
                pt4, ps4 = _np_softmax(t_logits / 4), _np_softmax(s_logits / 4)
                kl = np.dot(w, [16 * _hand_kl(pt4[t], ps4[t]) for t in range(len(w))]) / (w.sum() + 1e-6)
                ms, md = student_span.mean(0).numpy(), data_span.mean(0).numpy()
                align = 1 - ms @ md / (np.linalg.norm(ms) * np.linalg.norm(md))
                assert float(terms["ce"][row]) == pytest.approx(ce, abs=1e-4)
                assert float(terms["kl"][row]) == pytest.approx(kl, abs=1e-3)
                assert float(terms["align"][row]) == pytest.approx(align, abs=1e-5)
                assert float(terms["total"][row]) == pytest.approx(ce + 0.1 * kl + 0.1 * align, abs=1e-3)


def _grads_reach_only(objective: InterlatObjective, batch_size: int = 2) -> None:
    declared = objective.trainable()
    objective.train_mode()
    objective.on_step(1, 2)
    objective.loss(objective.examples[:batch_size]).backward()
    ids = {id(p) for _, p in declared}
    assert all(p.grad is not None for _, p in declared), [n for n, p in declared if p.grad is None]
    assert any(float(p.grad.abs().sum()) > 0 for _, p in declared)
    modules = [objective.receiver.model, objective.sender.model, objective.adapter]
    if objective.student is not None:
        modules.append(objective.student)
    for module in modules:
        for name, param in module.named_parameters():
            if id(param) not in ids:
                assert param.grad is None and not param.requires_grad, name


@pytest.mark.parametrize("full_finetune", [False, True])
def test_stage1_gradients_reach_only_the_declared_parameters(tmp_path, tiny_model_dir, data_file, full_finetune):
    objective = _objective(tmp_path, tiny_model_dir, data_file, full_finetune=full_finetune)
    names = [n for n, _ in objective.trainable()]
    assert any(n.startswith("adapter.begin_marker") for n in names)
    assert all(n.startswith("adapter.") or (full_finetune or "lora_" in n) for n in names)
    _grads_reach_only(objective)


def test_stage2_gradients_reach_only_the_student(tmp_path, tiny_model_dir, data_file, stage1_dir):
    objective = _objective(tmp_path, tiny_model_dir, data_file, stage=2, stage1=str(stage1_dir), latents=2)
    names = [n for n, _ in objective.trainable()]
    assert all(n.startswith("student.") or ".student." in n for n in names)
    _grads_reach_only(objective)


# ---------------------------------------------------------------------------------------------------- the backend


def _requests(texts=tuple(q.text for q in QUESTIONS)):
    gen = [
        Instance(
            "generate_until",
            {"answer_format": "boxed_number"},
            (text, {"until": [], "max_gen_toks": 6}),
            0,
            ("t", i, 1),
        )
        for i, text in enumerate(texts)
    ]
    mc = [
        Instance("loglikelihood", {"answer_format": "letter"}, (text, c), k, ("t_mc", i, 1))
        for i, text in enumerate(texts)
        for k, c in enumerate([" A", " B"])
    ]
    return gen, mc


def _backend(tmp_path: Path, name: str, model: Path, adapter: Path, dtype: str = "float32", **args):
    (tmp_path / name).mkdir()
    return backend_class("interlat")(
        pretrained=str(model),
        adapter=str(adapter),
        dtype=dtype,
        device="cpu",
        sidecar=str(tmp_path / name / "s.jsonl"),
        **args,
    )


@pytest.mark.parametrize("setting", [{}, {"communication": "text"}, {"communication": "other_doc"}, {"compressed": 3}])
def test_batch_1_equals_batch_n_with_fresh_backends(tmp_path, tiny_model_dir, stage2_dir, setting):
    gen, mc = _requests()
    outputs = {}
    for batch_size in (1, 3):
        lm = _backend(tmp_path, f"b{batch_size}", tiny_model_dir, stage2_dir, batch_size=batch_size, **setting)
        outputs[batch_size] = (lm.generate_until(gen, disable_tqdm=True), lm.loglikelihood(mc, disable_tqdm=True))
        totals = lm.get_model_info()["diffmas"]["totals"]
        assert totals.get("reused_requests", 0) == 0 and totals["requests"] == 6
    assert outputs[1][0] == outputs[3][0]
    assert [s for s, _ in outputs[1][1]] == pytest.approx([s for s, _ in outputs[3][1]], abs=1e-4)


@pytest.mark.parametrize("setting", [{}, {"communication": "text"}, {"communication": "other_doc"}, {"compressed": 3}])
def test_bf16_batch_1_equals_batch_n_bit_for_bit_with_batch_invariant(tmp_path, tiny_model_dir, stage2_dir, setting):
    """Issue 18 for Interlat: in bf16 with the mode on (the adapter and student run inside its kernels), batch 1, 3
    and 4 (fresh backends) give identical bits."""
    gen, mc = _requests()
    runs = []
    for batch_size in (1, 3, 4):
        lm = _backend(
            tmp_path,
            f"b{batch_size}",
            tiny_model_dir,
            stage2_dir,
            "bfloat16",
            batch_size=batch_size,
            batch_invariant=True,
            **setting,
        )
        runs.append((lm.generate_until(gen, disable_tqdm=True), lm.loglikelihood(mc, disable_tqdm=True)))
        assert lm.get_model_info()["diffmas"]["totals"].get("reused_requests", 0) == 0
    assert runs[0] == runs[1] == runs[2]
    if setting.get("communication") != "other_doc":  # the first document beside other neighbours
        gen, mc = _requests((QUESTIONS[0].text, *(item["question"] for item in ITEMS[3:6])))
        lm = _backend(
            tmp_path, "mixed", tiny_model_dir, stage2_dir, "bfloat16", batch_size=4, batch_invariant=True, **setting
        )
        outputs, scores = lm.generate_until(gen, disable_tqdm=True), lm.loglikelihood(mc, disable_tqdm=True)
        assert outputs[0] == runs[0][0][0] and scores[:2] == runs[0][1][:2]


def _one_position_forwards(method: Interlat) -> tuple[list[int], list[dict[str, int]]]:
    """Widths of the sender model's forwards while `method` builds the messages of QUESTIONS, and their costs."""
    widths: list[int] = []

    def record(module, args, kwargs):
        inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        widths.append(inputs.shape[1])

    hook = method.sender.decoder.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        _, costs = method.messages(QUESTIONS, GREEDY, [[] for _ in QUESTIONS])
    hook.remove()
    return widths, costs


def test_compressed_inference_costs_k_sender_steps(tmp_path, tiny_model_dir, stage2_dir):
    widths, costs = _one_position_forwards(_method(tiny_model_dir, stage2_dir, compressed=3))
    assert widths.count(1) == 3 and all(w > 1 for w in widths if w != 1)  # prefill(s), then K one-position steps
    assert costs == [{"message_length": 3, "sender_tokens": 0, "sender_steps": 3}] * 3
    widths, costs = _one_position_forwards(_method(tiny_model_dir, stage2_dir))
    assert widths.count(1) == max(c["message_length"] for c in costs) - 1  # the batch decodes until its longest plan
    assert all(c["sender_steps"] == c["message_length"] - 1 for c in costs)

    gen, _ = _requests()
    totals = {}
    for name, args in {"full": {}, "k3": {"compressed": 3}}.items():
        lm = _backend(tmp_path, name, tiny_model_dir, stage2_dir, batch_size=3, **args)
        lm.generate_until(gen, disable_tqdm=True)
        totals[name] = lm.get_model_info()["diffmas"]["totals"]
    assert totals["k3"]["sender_steps"] == totals["k3"]["latent_steps"] == totals["k3"]["message_length"] == 9
    assert totals["k3"]["sender_tokens"] == 0
    full = totals["full"]
    assert full["sender_steps"] == full["message_length"] - 3 and full["latent_steps"] == 0
    assert full["sender_tokens"] == full["generated_tokens"] - full["final_generated_tokens"] > 0


# ----------------------------------------------------------------------------------------- training and resuming


def _artefact_weights(directory: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for path in sorted(directory.rglob("*.safetensors")):
        if "checkpoints" not in path.parts and "messages" not in path.parts:
            weights.update({f"{path.relative_to(directory)}:{k}": v for k, v in load_file(str(path)).items()})
    return weights


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_is_bit_identical(tmp_path, tiny_model_dir, data_file, stage1_dir, stage):
    extra = {"stage": 2, "stage1": str(stage1_dir), "latents": 2} if stage == 2 else {"adapter_dropout": 0.1}
    whole = train(make_config(tmp_path / "whole", tiny_model_dir, data_file, max_steps=4, **extra))
    make = lambda **o: make_config(tmp_path / "split", tiny_model_dir, data_file, max_steps=4, **extra, **o)  # noqa: E731
    train(make(stop_after_steps=2))
    split = train(make(resume=True))
    a, b = _artefact_weights(whole), _artefact_weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (whole / TERMS_LOG).read_text() == (split / TERMS_LOG).read_text()
    assert (whole / "train_log.jsonl").read_text().count("\n") == 4


def test_an_interrupted_message_collection_resumes_in_the_same_batches(tmp_path, tiny_model_dir, monkeypatch):
    backbone = fresh(tiny_model_dir)
    roles = InterlatPrompts(load_prompt_set(), None, None)
    requests = [(MessageStore.key(it["question"]), roles.upstream(backbone, "sender", it["question"])) for it in ITEMS]
    settings = {"sender_fingerprint": backbone.fingerprint, "plan_tokens": 4}
    MessageStore(tmp_path / "whole", settings).collect(backbone, requests, 4, batch_size=2)

    original, writes = MessageStore._write, []

    def fail_after_one(self, keys, plans):
        if writes:
            raise KeyboardInterrupt
        writes.append(keys)
        original(self, keys, plans)

    monkeypatch.setattr(MessageStore, "_write", fail_after_one)
    with pytest.raises(KeyboardInterrupt):
        MessageStore(tmp_path / "split", settings).collect(backbone, requests, 4, batch_size=2)
    monkeypatch.setattr(MessageStore, "_write", original)
    resumed = MessageStore(tmp_path / "split", settings)
    assert len(resumed.plans) == 2 and resumed.collect(backbone, requests, 4, batch_size=2) == 4
    names = sorted(p.name for p in (tmp_path / "whole").glob("chunk-*"))
    assert names == sorted(p.name for p in (tmp_path / "split").glob("chunk-*")) and len(names) == 3
    for name in names:
        whole, split = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "split" / name))
        assert all(torch.equal(whole[k], split[k]) for k in whole)
    with pytest.raises(ValueError, match="collected with other settings \\(plan_tokens\\)"):
        MessageStore(tmp_path / "whole", {**settings, "plan_tokens": 5})


def test_training_reads_the_message_as_the_backend_scores_it(tmp_path, tiny_model_dir, data_file, stage1_dir):
    """The receiver path of training (the stage-2 teacher: the full stored message) scores a target exactly as the
    `interlat` backend's loglikelihood does with a freshly generated message."""
    objective = _objective(tmp_path, tiny_model_dir, data_file, stage=2, stage1=str(stage1_dir), append_eos=False)
    example = objective.examples[0]
    item = next(it for it in ITEMS if MessageStore.key(it["question"]) == example.key)
    with torch.no_grad():
        logits = objective.target_logits([example], objective.adapter([example.message]))[0]
    nll = float(torch.nn.functional.cross_entropy(logits, torch.tensor(example.target), reduction="sum"))
    lm = _backend(tmp_path, "score", tiny_model_dir, stage1_dir, plan_tokens=5)
    request = Instance(
        "loglikelihood", {"answer_format": "boxed_number"}, (item["question"], " " + item["target"]), 0, ("t", 0, 1)
    )
    ((score, _),) = lm.loglikelihood([request], disable_tqdm=True)
    assert -score == pytest.approx(nll, abs=1e-3)


def test_a_fully_fine_tuned_receiver_is_saved_and_decodes(tmp_path, tiny_model_dir, data_file):
    directory = train(make_config(tmp_path / "full", tiny_model_dir, data_file, full_finetune=True, max_steps=1))
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["receiver_training"] == "full" and (directory / RECEIVER_DIR / "config.json").is_file()
    method = _method(tiny_model_dir, directory)
    assert method.receiver is not method.backbone and method.receiver.fingerprint != method.backbone.fingerprint
    gen, _ = _requests()
    lm = _backend(tmp_path, "full-eval", tiny_model_dir, directory)
    assert len(lm.generate_until(gen, disable_tqdm=True)) == 3


# -------------------------------------------------------------------------------------------------------- refusals


def test_bad_model_args_are_refused_before_any_weights_load(tmp_path, stage1_dir, stage2_dir):
    parse = backend_class("interlat").parse_model_args
    with pytest.raises(ValueError, match="interlat needs adapter=DIR"):
        parse({})
    with pytest.raises(ValueError, match="unknown communication 'latnet'"):
        parse({"adapter": str(stage1_dir), "communication": "latnet"})
    with pytest.raises(ValueError, match="needs a compression student"):
        parse({"adapter": str(stage1_dir), "compressed": 4})
    with pytest.raises(ValueError, match="has nothing to compress"):
        parse({"adapter": str(stage2_dir), "compressed": 4, "communication": "text"})
    with pytest.raises(ValueError, match="did you mean 'plan_tokens'"):
        parse({"adapter": str(stage1_dir), "plan_token": 4})
    with pytest.raises(FileNotFoundError, match="not a trained-artefact directory"):
        parse({"adapter": str(tmp_path)})
    (tmp_path / "manifest.json").write_text(json.dumps({"method": "c2c"}))
    with pytest.raises(ValueError, match="trained by `diffmas-train --method c2c`"):
        parse({"adapter": str(tmp_path)})


def test_an_artefact_of_other_models_is_refused(tiny_model_dir, tiny_untied_model_dir, stage1_dir):
    with pytest.raises(ValueError, match="was trained with receiver"):
        _method(tiny_untied_model_dir, stage1_dir)
    with pytest.raises(ValueError, match="was trained with sender"):
        Interlat(fresh(tiny_model_dir), adapter=str(stage1_dir), dtype="float32", sender=fresh(tiny_untied_model_dir))


def test_training_settings_are_checked_before_any_weights_load(tmp_path, tiny_model_dir, data_file, stage1_dir):
    with pytest.raises(ValueError, match="stage 2 needs --stage1"):
        make_config(tmp_path / "x", tiny_model_dir, data_file, stage=2)
    with pytest.raises(ValueError, match="is a stage-2 artefact|stage-1 one"):
        bad = tmp_path / "s2"
        bad.mkdir()
        (bad / "manifest.json").write_text(json.dumps({"method": "interlat", "stage": 2}))
        make_config(tmp_path / "x", tiny_model_dir, data_file, stage=2, stage1=str(bad))
    store = tmp_path / "store"
    _objective(tmp_path / "a", tiny_model_dir, data_file, message_store=str(store))
    with pytest.raises(ValueError, match="collected with other settings \\(plan_tokens\\)"):
        _objective(tmp_path / "b", tiny_model_dir, data_file, message_store=str(store), plan_tokens=6)
    with pytest.raises(ValueError, match="latent_steps does not apply"):
        InterlatObjective(make_config(tmp_path / "x", tiny_model_dir, data_file, latent_steps=2), "cpu")
