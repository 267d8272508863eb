"""NeuroMAS (issue 15) on the tiny model: graph specs and topology masks (checked in each node's rendered prompt),
equalities with the single agent and TextMAS, the mixed-adapter batch against node-by-node decoding, batch
invariance, per-node accounting, MC scoring by the output node; and the GRPO objective: zero advantages give zero
gradient, the loss and gradient equal TRL's, a rewarded token becomes more likely, resume is bit-identical, growth
keeps the trained nodes' outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from lm_eval.api.instance import Instance
from safetensors.torch import load_file

from diffmas_eval.core.backbone import load_backbone
from diffmas_eval.core.decode import DecodingConfig
from diffmas_eval.lm_backend import backend_class
from diffmas_eval.methods.base import Question
from diffmas_eval.methods.neuromas import OUTPUT_NODE, Graph, NeuroMAS, parse_graph
from diffmas_eval.prompts import load_prompt_set
from diffmas_eval.training.config import build_config
from diffmas_eval.training.data import DataReport, prepare_items
from diffmas_eval.training.neuromas import (
    ROLLOUT_LOG,
    NeuroMASGRPO,
    RLExample,
    completion_logps,
    group_advantages,
    grpo_token_loss,
)
from diffmas_eval.training.trainer import build_manifest, train

QUESTIONS = [
    "What is 2+2?",
    "Tom has 3 apples and buys 5 more apples each day for 4 days. How many apples does he have now?",
    "Which is a force? A. mass B. gravity",
    "A train travels 60 miles per hour for 3 hours. How far did it go?",
]
GREEDY = {"until": [], "max_gen_toks": 6, "do_sample": False}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DIFFMAS_DATA_DIR", raising=False)


def _requests(questions=QUESTIONS, gen_kwargs=GREEDY):
    return [
        Instance("generate_until", {"answer_format": "boxed_number"}, (q, dict(gen_kwargs)), 0, ("toy", i, 1))
        for i, q in enumerate(questions)
    ]


def _backend(name, model, directory: Path, batch_size=2, dtype="float32", **kwargs):
    directory.mkdir(parents=True, exist_ok=True)
    return backend_class(name)(
        pretrained=str(model),
        dtype=dtype,
        device="cpu",
        sidecar=str(directory / "sidecar.jsonl"),
        batch_size=batch_size,
        **kwargs,
    )


def _fresh_generate(name, model, directory: Path, requests, batch_size=2, **kwargs):
    """Outputs and side-car records of one fresh backend; nothing reused."""
    lm = _backend(name, model, directory, batch_size, **kwargs)
    outputs = lm.generate_until(requests, disable_tqdm=True)
    totals = lm.get_model_info()["diffmas"]["totals"]
    assert totals.get("reused_requests", 0) == 0 and totals["requests"] == len(requests)
    records = [json.loads(line) for line in (directory / "sidecar.jsonl").read_text().splitlines()]
    return outputs, records, lm


def _train_config(tmp_path: Path, model: Path, name="out", **overrides):
    data = tmp_path / "items.jsonl"
    if not data.exists():
        items = [{"question": f"What is {a} + {b}?", "target": f"\\boxed{{{a + b}}}"} for a, b in [(1, 2), (3, 4)]]
        data.write_text("".join(json.dumps({**item, "answer_format": "boxed_number"}) + "\n" for item in items))
    settings = {
        "method": "neuromas",
        "output_dir": str(tmp_path / name),
        "pretrained": str(model),
        "data": [str(data)],
        "dtype": "float32",
        "device": "cpu",
        "max_steps": 2,
        "per_device_batch_size": 2,
        "learning_rate": 1e-2,
        "lr_scheduler": "constant",
        "progress": False,
        "checkpoint_every": 1,
        "lora_target_modules": ["q_proj", "v_proj"],
        "lora_r": 4,
        "graph": "1",
        "group_size": 3,
        "node_max_new_tokens": 3,
        "answer_max_new_tokens": 3,
    }
    return build_config({**settings, **overrides})


def write_random_graph(model: Path, out: Path, graph: str, tmp_path: Path, seed: int = 0) -> Path:
    """A NeuroMAS artefact with random (non-zero) LoRA weights per node, written by the objective's own save and
    manifest (as `diffmas-train` writes them), without training."""
    config = _train_config(tmp_path, model, name=f"cfg-{out.name}", graph=graph, output_dir=str(out))
    objective = NeuroMASGRPO(config, "cpu", backbone=load_backbone(str(model), dtype="float32", device="cpu"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in objective.trainable():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    out.mkdir(parents=True, exist_ok=True)
    objective.save(out)
    from diffmas_eval.artifacts import write_manifest

    write_manifest(out, build_manifest(config, objective, DataReport(), 0, 0))
    return out


@pytest.fixture(scope="module")
def graph_adapters(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("neuromas-adapters")
    return write_random_graph(tiny_model_dir, root / "g2x2", "2x2", root)


# --- graph specs and topology ---


def test_graph_specs_and_bad_input_fail_before_loading(tmp_path):
    assert parse_graph("2x2") == (2, 2) and parse_graph(3) == (3,) and parse_graph("0") == ()
    for bad in ("2y2", "0x2", "x", "-1"):
        with pytest.raises(ValueError, match="layer widths"):
            parse_graph(bad)
    with pytest.raises(ValueError, match="equal layer widths"):
        Graph.build((2, 3), "chain")
    mask = tmp_path / "mask.yaml"
    mask.write_text(yaml.safe_dump({"L2N1": ["L2N1"], "OUT": ["L2N1"]}))
    with pytest.raises(ValueError, match="earlier layers"):
        Graph.build((1, 1), mask=mask)
    mask.write_text(yaml.safe_dump({"OUT": ["L2N1"]}))
    with pytest.raises(ValueError, match="no node reads L1N1"):
        Graph.build((1, 1), mask=mask)
    # the backend refuses before loading any weights (the model path does not even exist)
    for args, message in [
        ({"graph": "2y2"}, "layer widths"),
        ({"connectivity": "ring"}, "unknown connectivity"),
        ({"batching": "fast"}, "unknown batching"),
        ({"adapters": str(tmp_path)}, "not a trained-artefact directory"),
        ({"grap": "2x2"}, "did you mean 'graph'"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            backend_class("neuromas")(pretrained=str(tmp_path / "missing"), device="cpu", **args)


def _node_prompts(method: NeuroMAS, questions: list[str]) -> tuple[dict, list[dict[str, str]]]:
    """Each node's rendered prompt text per row, and the messages it could read."""
    batch = [Question(q, "boxed_number") for q in questions]
    messages, _, record = method.run_hidden_layers(batch, DecodingConfig(max_new_tokens=4))
    prompts = {(node, row): method.backbone.tokenizer.decode(prompt) for node, row, prompt, _ in record}
    for row, question in enumerate(batch):
        prompts[(OUTPUT_NODE, row)] = method.backbone.tokenizer.decode(
            method.render_node(OUTPUT_NODE, question, messages[row])
        )
    return prompts, messages


@pytest.mark.parametrize("connectivity", ["full", "chain", "mask"])
def test_topology_routes_exactly_the_intended_messages(connectivity, tiny_model_dir, tmp_path):
    backbone = load_backbone(str(tiny_model_dir), dtype="float32", device="cpu")
    if connectivity == "mask":  # a skip connection and a node that reads a node two layers back
        mask = tmp_path / "mask.json"
        mask.write_text(json.dumps({"L2N1": ["L1N2"], "L2N2": ["L1N1", "L1N2"], "OUT": ["L1N1", "L2N1", "L2N2"]}))
        method = NeuroMAS(backbone, graph="2x2", mask=str(mask), max_new_tokens=4)
        expected = {"L2N1": ["1.2"], "L2N2": ["1.1", "1.2"], "OUT": ["1.1", "2.1", "2.2"]}
    else:
        method = NeuroMAS(backbone, graph="2x2", connectivity=connectivity, max_new_tokens=4)
        expected = {
            "L2N1": ["1.1", "1.2"] if connectivity == "full" else ["1.1"],
            "L2N2": ["1.1", "1.2"] if connectivity == "full" else ["1.2"],
            "OUT": ["2.1", "2.2"],
        }
    expected.update({"L1N1": [], "L1N2": []})
    prompts, messages = _node_prompts(method, QUESTIONS[:2])
    labels = {"L1N1": "1.1", "L1N2": "1.2", "L2N1": "2.1", "L2N2": "2.2"}
    for (node, row), text in prompts.items():
        for source, label in labels.items():
            entry = f"[Node {label}]:\n{messages[row][source].strip()}"
            assert (entry in text) == (label in expected[node]), (node, source, text)
        assert QUESTIONS[row] in text
    # the role-free prompt names the node's position and its inputs, nothing else
    assert "You are node 2.1 (layer 2, position 1)" in prompts[("L2N1", 0)]
    if connectivity == "full":
        assert "You read the messages of nodes 1.1 and 1.2." in prompts[("L2N2", 0)]


def test_one_node_graph_equals_the_single_agent(tiny_model_dir, tmp_path):
    ours, records, _ = _fresh_generate("neuromas", tiny_model_dir, tmp_path / "n", _requests(), graph=0)
    single, _, _ = _fresh_generate("single-agent", tiny_model_dir, tmp_path / "s", _requests())
    assert ours == single and len(set(ours)) > 1
    assert all(r["agents"] == [] for r in records)
    mc = [
        Instance("loglikelihood", {"answer_format": "letter"}, (q, c), k, ("mc", i, 1))
        for i, q in enumerate(QUESTIONS)
        for k, c in enumerate("AB")
    ]
    assert _backend("neuromas", tiny_model_dir, tmp_path / "n2", graph=0).loglikelihood(mc, disable_tqdm=True) == (
        _backend("single-agent", tiny_model_dir, tmp_path / "s2").loglikelihood(mc, disable_tqdm=True)
    )


def test_untrained_1x1x1_graph_equals_text_mas_with_the_same_prompts(tiny_model_dir, tmp_path):
    """TextMAS's sequential agents read every earlier agent, so the graph reads every earlier layer (a mask)."""
    data = yaml.safe_load(open(load_prompt_set().path).read())
    first, inner, last = (
        "First look: {question}",
        "Q: {question}\nSo far:\n{transcript}\nGo on.",
        "Q: {question}\nNotes:\n{transcript}",
    )
    data["neuromas"].update(input_node=first, inner_node=inner, output_node=last, message_entry="<<{text}>>\n\n")
    data["text_mas"]["sequential"] = {"planner": first, "critic": inner, "refiner": inner, "judger": last}
    data["transcript_entry"] = "<<{text}>>\n\n"
    prompts = tmp_path / "same.yaml"
    prompts.write_text(yaml.safe_dump(data, sort_keys=False))  # TextMAS's role order is the file's
    mask = tmp_path / "dense.json"
    mask.write_text(json.dumps({"L2N1": ["L1N1"], "L3N1": ["L1N1", "L2N1"], "OUT": ["L1N1", "L2N1", "L3N1"]}))
    common = {"prompts": str(prompts), "max_new_tokens": 5}
    ours, ours_records, _ = _fresh_generate(
        "neuromas", tiny_model_dir, tmp_path / "n", _requests(), graph="1x1x1", mask=str(mask), **common
    )
    text, text_records, _ = _fresh_generate("text-mas", tiny_model_dir, tmp_path / "t", _requests(), **common)
    assert ours == text
    for a, b in zip(ours_records, text_records, strict=True):
        assert [(x["prompt_tokens"], x["generated_tokens"], x["text"]) for x in a["agents"]] == [
            (x["prompt_tokens"], x["generated_tokens"], x["text"]) for x in b["agents"]
        ]
        assert a["final"] == b["final"]


# --- adapters: mixed-adapter batches, batch invariance, accounting, MC scoring ---


def test_mixed_adapter_batch_equals_node_by_node_decoding(tiny_model_dir, graph_adapters, tmp_path):
    requests = _requests()
    mixed, mixed_records, _ = _fresh_generate(
        "neuromas", tiny_model_dir, tmp_path / "m", requests, 4, adapters=str(graph_adapters)
    )
    per_node, node_records, _ = _fresh_generate(
        "neuromas", tiny_model_dir, tmp_path / "p", requests, 4, adapters=str(graph_adapters), batching="per_node"
    )
    untrained, untrained_records, _ = _fresh_generate("neuromas", tiny_model_dir, tmp_path / "u", requests, 4)
    assert mixed == per_node
    assert [r["agents"] for r in mixed_records] == [r["agents"] for r in node_records]
    # the adapters act, and each node runs under its own: same-layer nodes given the same inputs write differently
    assert [r["agents"] for r in mixed_records] != [r["agents"] for r in untrained_records]
    texts = {a["role"]: a["text"] for a in mixed_records[0]["agents"]}
    assert texts["L2N1"] != texts["L2N2"]


def test_batch_one_equals_batch_n_with_adapters(tiny_model_dir, graph_adapters, tmp_path):
    one, _, _ = _fresh_generate(
        "neuromas", tiny_model_dir, tmp_path / "b1", _requests(), 1, adapters=str(graph_adapters)
    )
    many, _, _ = _fresh_generate(
        "neuromas", tiny_model_dir, tmp_path / "b4", _requests(), 4, adapters=str(graph_adapters)
    )
    assert one == many and len(set(one)) > 1


@pytest.mark.parametrize("trained", [False, True])
def test_bf16_outputs_and_loglikelihoods_are_bit_identical_at_any_batch_with_batch_invariant(
    tiny_model_dir, graph_adapters, tmp_path, trained
):
    """Issue 18 for NeuroMAS: batch 1, 3 and 4 (fresh backends) give the same bits in bf16, mixed-adapter layers too."""
    args = {"adapters": str(graph_adapters)} if trained else {"graph": "2x2"}
    mc = [
        Instance("loglikelihood", {"answer_format": "letter"}, (q, c), k, ("toy_mc", i, 1))
        for i, q in enumerate(QUESTIONS)
        for k, c in enumerate([" A", " B"])
    ]
    runs = []
    for batch_size in (1, 3, 4):
        outputs, _, lm = _fresh_generate(
            "neuromas",
            tiny_model_dir,
            tmp_path / f"b{batch_size}",
            _requests(),
            batch_size,
            dtype="bfloat16",
            batch_invariant=True,
            **args,
        )
        runs.append((outputs, lm.loglikelihood(mc, disable_tqdm=True)))
        assert lm.get_model_info()["diffmas"]["batch_invariant"] is True
    assert runs[0] == runs[1] == runs[2] and len(set(runs[0][0])) > 1
    # the first document beside other neighbours
    batch = [QUESTIONS[0], "What is 7 times 8?", "How many minutes are in 5 hours?", "Is water a cell?"]
    outputs, _, lm = _fresh_generate(
        "neuromas",
        tiny_model_dir,
        tmp_path / "mixed",
        _requests(batch),
        4,
        dtype="bfloat16",
        batch_invariant=True,
        **args,
    )
    mixed_mc = [
        Instance("loglikelihood", {"answer_format": "letter"}, (q, c), k, ("toy_mc", i, 1))
        for i, q in enumerate(batch)
        for k, c in enumerate([" A", " B"])
    ]
    assert outputs[0] == runs[0][0][0] and lm.loglikelihood(mixed_mc, disable_tqdm=True)[:2] == runs[0][1][:2]


def test_accounting_is_per_node_and_settings_record_the_graph(tiny_model_dir, graph_adapters, tmp_path):
    _, records, lm = _fresh_generate(
        "neuromas", tiny_model_dir, tmp_path / "a", _requests(), adapters=str(graph_adapters)
    )
    for record in records:
        assert [a["role"] for a in record["agents"]] == ["L1N1", "L1N2", "L2N1", "L2N2"]
        assert all(a["prompt_tokens"] > 0 and 0 < a["generated_tokens"] <= 256 for a in record["agents"])
    info = lm.get_model_info()["diffmas"]
    assert info["graph"] == "2x2" and info["connectivity"] == "full" and info["inputs"]["OUT"] == ["L2N1", "L2N2"]
    assert info["adapters_fingerprint"] and info["totals"]["generated_tokens"] == sum(
        sum(a["generated_tokens"] for a in r["agents"]) + r["final"]["generated_tokens"] for r in records
    )


def test_loglikelihood_is_scored_by_the_output_node_under_its_adapter(tiny_model_dir, graph_adapters, tmp_path):
    from peft import PeftModel

    question, choices = QUESTIONS[2], ["A", "B"]
    requests = [
        Instance("loglikelihood", {"answer_format": "letter"}, (question, c), k, ("mc", 0, 1))
        for k, c in enumerate(choices)
    ]
    lm = _backend("neuromas", tiny_model_dir, tmp_path / "ll", adapters=str(graph_adapters))
    scores = lm.loglikelihood(requests, disable_tqdm=True)
    record = json.loads((tmp_path / "ll" / "sidecar.jsonl").read_text().splitlines()[0])
    # independently: the output node's prompt from the recorded messages, one plain forward under OUT's adapter alone
    backbone = load_backbone(str(tiny_model_dir), dtype="float32", device="cpu")
    method = NeuroMAS(backbone, graph="2x2")
    messages = {a["role"]: a["text"] for a in record["agents"]}
    prompt = method.render_node(OUTPUT_NODE, Question(question, "letter"), messages)
    model = PeftModel.from_pretrained(backbone.model, str(graph_adapters / OUTPUT_NODE)).eval()
    for choice, (logprob, _) in zip(choices, scores, strict=True):
        target = backbone.encode(choice)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1].float()
        expected = float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(target)[:, None]).sum())
        assert logprob == pytest.approx(expected, abs=1e-4)


# --- the GRPO objective ---


def _objective(tmp_path, model, **overrides) -> NeuroMASGRPO:
    config = _train_config(tmp_path, model, **overrides)
    objective = NeuroMASGRPO(config, "cpu", backbone=load_backbone(str(model), dtype="float32", device="cpu"))
    objective.trainable()
    objective.train_mode()
    return objective


def _examples(n=2):
    return [RLExample(f"q{i}", f"What is {i} + 2?", "boxed_number", str(i + 2)) for i in range(n)]


def test_group_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    advantages = group_advantages(rewards, 3)
    assert advantages[3:].abs().max() == 0  # a group without signal contributes nothing
    assert advantages[:3].sum().abs() < 1e-6 and advantages[0] > 0 > advantages[1]
    assert torch.allclose(advantages[:3], (rewards[:3] - rewards[:3].mean()) / (rewards[:3].std() + 1e-4))


def test_zero_advantages_give_zero_gradient_on_every_node(tiny_model_dir, tmp_path):
    objective = _objective(tmp_path, tiny_model_dir, graph="2")
    rollout = objective.rollout(_examples())
    assert {s.node for s in rollout.sequences} == {"L1N1", "L1N2", "OUT"}
    objective.policy_loss(rollout, torch.zeros(len(rollout.answers))).backward()
    params = objective.trainable()
    assert all(p.grad is None or p.grad.abs().max() == 0 for _, p in params)
    # the same rollout with non-zero advantages moves every node's adapter (the test above can fail)
    objective.policy_loss(rollout, torch.linspace(-1, 1, len(rollout.answers))).backward()
    for node in ("L1N1", "L1N2", "OUT"):
        assert any(p.grad is not None and p.grad.abs().max() > 0 for n, p in params if f".{node}." in n), node


def test_one_node_loss_and_gradient_equal_trl_grpo(tiny_model_dir, tmp_path):
    """graph=0 (the output node alone): our loss against TRL's GRPOTrainer._compute_loss on the same prompts,
    completions, advantages and reference log-probs, and our gradient against a plain computation."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    objective = _objective(tmp_path, tiny_model_dir, graph="0", beta=0.04, epsilon_high=0.28)
    with torch.no_grad():  # a policy that differs from the reference, so the KL term is not zero
        for _, param in objective.trainable():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    rollout = objective.rollout(_examples(2))
    advantages = torch.tensor([0.5, -1.0, 0.5, 1.2, -0.3, -0.9])
    loss = objective.policy_loss(rollout, advantages) / len(rollout.sequences)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in objective.trainable()}
    for _, p in objective.trainable():
        p.grad = None

    backbone, seqs = objective.backbone, rollout.sequences
    width_p, width_c = max(len(s.prompt) for s in seqs), max(len(s.completion) for s in seqs)
    prompt_ids = torch.tensor([[backbone.pad_token_id] * (width_p - len(s.prompt)) + s.prompt for s in seqs])
    prompt_mask = torch.tensor([[0] * (width_p - len(s.prompt)) + [1] * len(s.prompt) for s in seqs])
    completion_ids = torch.tensor(
        [s.completion + [backbone.pad_token_id] * (width_c - len(s.completion)) for s in seqs]
    )
    completion_mask = torch.tensor([[1] * len(s.completion) + [0] * (width_c - len(s.completion)) for s in seqs])
    with torch.no_grad(), backbone.model.disable_adapter():
        ref, _ = completion_logps(backbone, [s.prompt for s in seqs], [s.completion for s in seqs])
    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.0,  # set to 0.04 below: with beta > 0 TRL's init wants a peft adapter named "default" to copy
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type="grpo",
        num_generations=3,
        per_device_train_batch_size=6,
        use_cpu=True,
        report_to=[],
        bf16=False,
        gradient_checkpointing=False,
    )
    trainer = GRPOTrainer(
        model=backbone.model,
        reward_funcs=lambda completions, **_: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "x"}] * 6),
        processing_class=backbone.tokenizer,
    )
    backbone.model.set_adapter(OUTPUT_NODE)
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "ref_per_token_logps": ref,
        "num_items_in_batch": completion_mask.sum(),
    }
    trainer.beta = 0.04
    trainer.current_gradient_accumulation_steps = 1  # set by TRL's training loop, which this test does not run
    trl_loss = trainer._compute_loss(backbone.model, inputs)
    assert float(loss) == pytest.approx(float(trl_loss), rel=1e-5, abs=1e-7)

    # the gradient, against a plain computation written out here: one forward over [prompt; completion] (positions
    # 0..L-1: the prompts are equally long), log-softmax, the GRPO and k3 formulas (TRL 1.16's own backward runs
    # through its fused, tiled LM head; its LoRA gradient differs from autograd's on this model, see the README)
    assert bool(prompt_mask.all())  # equally long prompts: positions need no padding offset
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    logits = backbone.model(input_ids=ids, attention_mask=torch.cat([prompt_mask, completion_mask], 1)).logits
    logps = torch.log_softmax(logits[:, width_p - 1 : -1].float(), -1).gather(-1, completion_ids[..., None])[..., 0]
    ratio = torch.exp(logps - logps.detach())
    policy = -torch.min(ratio * advantages[:, None], torch.clamp(ratio, 0.8, 1.28) * advantages[:, None])
    per_token = policy + 0.04 * (torch.exp(ref - logps) - (ref - logps) - 1)
    plain = ((per_token * completion_mask).sum(1) / completion_mask.sum(1)).mean()
    assert float(plain) == pytest.approx(float(loss), rel=1e-5, abs=1e-7)
    for _, p in objective.trainable():
        p.grad = None
    plain.backward()
    for name, param in objective.trainable():
        assert torch.allclose(ours[name], param.grad, atol=1e-6, rtol=1e-4), name
    assert any(g.abs().max() > 0 for g in ours.values())


def test_grpo_token_loss_matches_a_hand_computation():
    logps = torch.tensor([[-1.0, -2.0]])
    old = torch.tensor([[-1.5, -1.0]])
    ref = torch.tensor([[-1.2, -2.5]])
    loss = grpo_token_loss(logps, old, torch.tensor([2.0]), 0.2, 0.3, ref, 0.1)
    ratio = [torch.exp(torch.tensor(0.5)), torch.exp(torch.tensor(-1.0))]
    expected = [-min(r * 2, min(max(r, 0.8), 1.3) * 2) for r in ratio]
    kl = [torch.exp(torch.tensor(d)) - d - 1 for d in (-0.2, -0.5)]
    assert torch.allclose(loss, torch.tensor([[float(e + 0.1 * k) for e, k in zip(expected, kl, strict=True)]]))


def test_a_reward_that_prefers_one_token_makes_it_more_likely(tiny_model_dir, tmp_path, monkeypatch):
    backbone = load_backbone(str(tiny_model_dir), dtype="float32", device="cpu")
    prompt = NeuroMAS(backbone, graph="0").render_node(OUTPUT_NODE, Question("What is 1 + 2?", "boxed_number"), {})
    with torch.no_grad():
        first = torch.softmax(backbone.model(input_ids=torch.tensor([prompt])).logits[0, -1].float(), -1)
    # a token the untrained model sometimes samples first, but not its favourite
    candidates = [
        t
        for t in first.argsort(descending=True).tolist()
        if 0.01 < first[t] < 0.5 and t not in backbone.eos_token_ids and backbone.encode(backbone.decode([t])) == [t]
    ]
    favoured = candidates[0]
    word = backbone.decode([favoured])
    monkeypatch.setattr(NeuroMASGRPO, "reward", lambda self, text, example: float(text == word))

    def favoured_probability(model_backbone) -> float:
        method = NeuroMAS(model_backbone, graph="0")
        prompt = method.render_node(OUTPUT_NODE, Question("What is 1 + 2?", "boxed_number"), {})
        with torch.no_grad(), method.acting_as("judger"):
            logps, _ = completion_logps(model_backbone, [prompt], [[favoured]])
        return float(logps.exp())

    before = favoured_probability(backbone)
    config = _train_config(
        tmp_path, tiny_model_dir, graph="0", max_steps=8, group_size=8, answer_max_new_tokens=1, learning_rate=3e-2
    )
    train(config, backbone=backbone)
    backbone.model.eval()
    after = favoured_probability(backbone)
    assert after > max(2 * before, before + 0.05), (before, after)
    log = [json.loads(line) for line in (tmp_path / "out" / ROLLOUT_LOG).read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9)) and log[-1]["rollout_tokens"] == sum(
        r["generated_tokens"] for r in log
    )


def test_resume_is_bit_identical(tiny_model_dir, tmp_path, monkeypatch):
    # a reward that depends on the sampled text, so that the weights move with the rollouts
    monkeypatch.setattr(NeuroMASGRPO, "reward", lambda self, text, example: float(sum(map(ord, text)) % 2))
    straight = train(_train_config(tmp_path, tiny_model_dir, name="straight", max_steps=3))
    _ = train(_train_config(tmp_path, tiny_model_dir, name="pieces", max_steps=3, stop_after_steps=1))
    pieces = train(_train_config(tmp_path, tiny_model_dir, name="pieces", max_steps=3, resume=True))
    for node in ("L1N1", "OUT"):
        a = load_file(str(straight / node / "adapter_model.safetensors"))
        b = load_file(str(pieces / node / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert any("lora_B" in k and a[k].abs().max() > 0 for k in a)  # trained: B starts at zero
    assert (straight / ROLLOUT_LOG).read_text() == (pieces / ROLLOUT_LOG).read_text()


def test_growth_keeps_the_trained_nodes_outputs(tiny_model_dir, tmp_path):
    small = write_random_graph(tiny_model_dir, tmp_path / "small", "1x1", tmp_path, seed=3)
    config = _train_config(tmp_path, tiny_model_dir, name="grown", graph="1x2", grow_from=str(small))
    objective = NeuroMASGRPO(config, "cpu", backbone=load_backbone(str(tiny_model_dir), dtype="float32", device="cpu"))
    objective.trainable()
    grown = tmp_path / "grown"
    grown.mkdir()
    objective.save(grown)
    from diffmas_eval.artifacts import write_manifest

    write_manifest(grown, build_manifest(config, objective, DataReport(), 0, 0))
    manifest = json.loads((grown / "manifest.json").read_text())
    assert manifest["graph"]["graph"] == "1x2" and manifest["lineage"][0]["graph"] == "1x1"
    # the new node starts as a copy of its trained neighbour
    assert (
        load_file(str(grown / "L2N2" / "adapter_model.safetensors")).keys()
        == load_file(str(small / "L2N1" / "adapter_model.safetensors")).keys()
    )
    for key, value in load_file(str(small / "L2N1" / "adapter_model.safetensors")).items():
        assert torch.equal(load_file(str(grown / "L2N2" / "adapter_model.safetensors"))[key], value)
    _, small_records, _ = _fresh_generate("neuromas", tiny_model_dir, tmp_path / "es", _requests(), adapters=str(small))
    _, grown_records, _ = _fresh_generate("neuromas", tiny_model_dir, tmp_path / "eg", _requests(), adapters=str(grown))
    for a, b in zip(small_records, grown_records, strict=True):
        before = {x["role"]: x["text"] for x in a["agents"]}
        after = {x["role"]: x["text"] for x in b["agents"]}
        assert after["L1N1"] == before["L1N1"] and after["L2N1"] == before["L2N1"]
    # refused: a graph that does not contain the trained one
    with pytest.raises(ValueError, match="does not grow"):
        _train_config(tmp_path, tiny_model_dir, name="bad", graph="1", grow_from=str(small))


def test_arithmetic_task_splits_are_fixed_and_disjoint_and_train_without_data(tmp_path):
    from diffmas_eval.benchmarks.arithmetic import arithmetic_rows

    test, train_rows = arithmetic_rows("test"), arithmetic_rows("train")
    assert len(test) == 200 and len(train_rows) == 600 and arithmetic_rows("test") == test
    assert not {r["problem"] for r in test} & {r["problem"] for r in train_rows}
    items, report = prepare_items(["arithmetic"], None, None, decontaminate_items=False, max_items=None, seed=0)
    assert len(items) == 600 and report.loaded == {"arithmetic": 600}
    a, b = (int(x) for x in items[0].question.removeprefix("What is ").removesuffix("?").split(" + "))
    from diffmas_eval.training.neuromas import gold_answer

    assert gold_answer(items[0]) == str(a + b)
