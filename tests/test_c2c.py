"""C2C (issue 13) on two tiny models of different depth, width, KV heads and head dimension that share a tokenizer:
closed gates are the receiver alone, the fused cache against an independent computation, gradients, batch
invariance, save/load/resume, refusals, the lm-eval command, and the T2T baseline (TextMAS with another model)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from safetensors.torch import load_file

from diffmas_eval.artifacts import write_manifest
from diffmas_eval.core.backbone import load_backbone
from diffmas_eval.core.decode import DecodingConfig, generate
from diffmas_eval.lm_backend import backend_class
from diffmas_eval.methods import Question
from diffmas_eval.methods.c2c import C2C, fit_length
from diffmas_eval.methods.c2c_fuser import FUSER_WEIGHTS, C2CFuser, FuserConfig, KVShape, gate_temperature
from diffmas_eval.testing import build_tiny_model
from diffmas_eval.training.config import build_config
from diffmas_eval.training.trainer import TRAIN_LOG, train

BIN = Path(sys.executable).parent
QUESTIONS = [
    "What is 2+2?",
    "Tom has 3 apples and buys 5 more apples each day for 4 days. How many apples does he have now?",
    "Which is a force? A. mass B. gravity",
    "A train travels 60 miles per hour for 3 hours, then 40 miles per hour for 2 hours. How far did it go?",
    "Is water a cell?",
]
ITEMS = [
    {"question": f"Question {i}: is the {['plant', 'cell', 'book', 'train'][i % 4]} green?", "target": t}
    for i, t in enumerate(["yes", "no", "no", "yes", "yes", "no", "yes", "no"])
]
SIZES = {"hidden_dim": 32, "intermediate_dim": 48, "num_layers": 4, "fuser_dropout": 0.1}


def build_tiny_sharer(path: Path, *, extra_token: bool = False) -> Path:
    """A tiny Qwen2 unlike `build_tiny_model`'s default: 3 layers, width 96, one KV head of dimension 24; the same
    tokenizer (or, with `extra_token`, one more token: another vocabulary)."""
    extra = ("<|sharer_only|>",) if extra_token else ()
    return build_tiny_model(
        path, layers=3, hidden_size=96, intermediate_size=160, kv_heads=1, seed=7, extra_tokens=extra
    )


def write_fuser(receiver_dir: Path, sharer_dir: Path, out: Path, gates: str = "open", seed: int = 0) -> Path:
    """A fuser directory with random weights and a manifest for (receiver, sharer). `gates`: `open` (every K and V
    gate), `closed` (none) or `mixed` (layer 0: K only; layer 1: V only)."""
    receiver = load_backbone(str(receiver_dir), dtype="float32", device="cpu")
    sharer = load_backbone(str(sharer_dir), dtype="float32", device="cpu")
    config = FuserConfig(
        receiver=KVShape.of(receiver.causal_lm),
        sharer=KVShape.of(sharer.causal_lm),
        hidden_dim=32,
        intermediate_dim=48,
        num_layers=4,
        dropout=0.1,
    )
    torch.manual_seed(seed)
    fuser = C2CFuser(config)
    with torch.no_grad():
        for index, layer in enumerate(fuser.layers):
            key_open = gates == "open" or (gates == "mixed" and index % 2 == 0)
            value_open = gates == "open" or (gates == "mixed" and index % 2 == 1)
            layer.key_gate_logit.fill_(1.0 if key_open else -1.0)
            layer.value_gate_logit.fill_(1.0 if value_open else -1.0)
            for stack in (layer.key, layer.value):
                stack.projection_out.weight.mul_(20.0)  # a fusion large enough to change greedy outputs
    fuser.save(out)
    manifest = {
        "method": "c2c",
        "backbones": {
            "receiver": {"name": str(receiver_dir), "fingerprint": receiver.fingerprint},
            "sharer": {"name": str(sharer_dir), "fingerprint": sharer.fingerprint},
        },
        "note": f"random test fuser, gates {gates}",
    }
    write_manifest(out, manifest)
    return out


@pytest.fixture(scope="module")
def sharer_dir(tmp_path_factory) -> Path:
    return build_tiny_sharer(tmp_path_factory.mktemp("sharer"))


@pytest.fixture(scope="module")
def fusers(tiny_model_dir, sharer_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fusers")
    return {
        gates: write_fuser(tiny_model_dir, sharer_dir, root / gates, gates) for gates in ("open", "closed", "mixed")
    }


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("c2c-data") / "toy.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    return path


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DIFFMAS_DATA_DIR", raising=False)


def _generate_requests(questions=QUESTIONS, max_gen_toks=10):
    kwargs = {"until": [], "max_gen_toks": max_gen_toks, "do_sample": False}
    return [
        Instance("generate_until", {"answer_format": "boxed_number"}, (q, dict(kwargs)), 0, ("toy", i, 1))
        for i, q in enumerate(questions)
    ]


def _mc_requests(questions=QUESTIONS, choices=("A", "B", "C", "D")):
    return [
        Instance("loglikelihood", {"answer_format": "letter"}, (q, c), k, ("toy_mc", i, 1))
        for i, q in enumerate(questions)
        for k, c in enumerate(choices)
    ]


def _fresh(name: str, directory: Path, dtype: str = "float32", **args):
    """A fresh backend with its own side-car (nothing can be reused from another run)."""
    directory.mkdir(parents=True)
    return backend_class(name)(dtype=dtype, device="cpu", sidecar=str(directory / "sidecar.jsonl"), **args)


def _run_requests(lm, generate_requests, mc_requests):
    outputs = lm.generate_until(generate_requests, disable_tqdm=True), lm.loglikelihood(mc_requests, disable_tqdm=True)
    assert lm.get_model_info()["diffmas"]["totals"].get("reused_requests", 0) == 0
    return outputs


def _c2c_args(receiver: Path, sharer: Path, fuser: Path, **extra):
    return {"pretrained": str(receiver), "sharer": str(sharer), "fuser": str(fuser), **extra}


# --- the fuser ---


def test_layer_map_is_last_aligned():
    def shape(layers):
        return KVShape(layers=layers, kv_heads=2, head_dim=8)

    assert FuserConfig(receiver=shape(2), sharer=shape(3)).layer_map() == [1, 2]
    assert FuserConfig(receiver=shape(4), sharer=shape(2)).layer_map() == [0, 0, 0, 1]
    assert FuserConfig(receiver=shape(3), sharer=shape(3)).layer_map() == [0, 1, 2]


def test_temperature_anneals_per_step_and_gates_are_hard_at_inference(tiny_model_dir, sharer_dir):
    assert gate_temperature(1, 10, 1.0, 0.001) == 1.0
    assert gate_temperature(11, 10, 1.0, 0.001) == pytest.approx(0.001)
    assert gate_temperature(50, 10, 1.0, 0.001) == pytest.approx(0.001)
    assert gate_temperature(6, 10, 1.0, 0.01) == pytest.approx(0.1)
    fuser = C2CFuser(FuserConfig(receiver=KVShape(2, 2, 16), sharer=KVShape(3, 1, 24), hidden_dim=8))
    layer = fuser.layers[0]
    assert fuser.open_layers() == []  # gate logits start at 0: a fresh fuser is closed at inference
    layer.train()
    soft = layer.gate(layer.key_gate_logit, (1, 2, 5, 1), temperature=1.0)
    assert ((soft > 0) & (soft < 1)).all() and soft.unique().numel() > 1  # Gumbel noise per head and token
    layer.eval()
    with torch.no_grad():
        layer.key_gate_logit.fill_(0.5)
    assert torch.equal(layer.gate(layer.key_gate_logit, (1, 2, 5, 1), 1.0), torch.ones(1, 2, 5, 1))


def _reference_stack(state: dict[str, torch.Tensor], prefix: str, blocks: int, sharer, receiver) -> torch.Tensor:
    """The K or V fusion of one layer for one row, from the saved weights with plain tensor operations."""

    def linear(x, name, bias=True):
        out = x @ state[f"{prefix}.{name}.weight"].T
        return out + state[f"{prefix}.{name}.bias"] if bias else out

    def block(x, name):
        norm = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * state[f"{prefix}.{name}.norm.weight"]
        hidden = torch.nn.functional.gelu(linear(norm, f"{name}.w1", bias=False))
        return x + linear(hidden, f"{name}.w2", bias=False)

    heads, tokens, dim = receiver.shape
    features = torch.cat(
        [sharer.permute(1, 0, 2).reshape(tokens, -1), receiver.permute(1, 0, 2).reshape(tokens, -1)], dim=-1
    )
    hidden = block(linear(features, "input"), "common")
    projected = hidden
    for index in range(blocks):
        projected = block(projected, f"projection.{index}")
    projected = linear(projected, "projection_out").reshape(tokens, heads, dim).permute(1, 0, 2)
    weight = torch.sigmoid(linear(block(hidden, "weight_branch"), "weight_out")).T.unsqueeze(-1)
    return receiver + weight * projected


def test_fused_cache_equals_an_independent_reference_computation(tiny_model_dir, sharer_dir, fusers):
    method = C2C.load(
        C2C.config_class(**_c2c_args(tiny_model_dir, sharer_dir, fusers["mixed"], dtype="float32")), "cpu"
    )
    questions = [Question(q, "letter") for q in QUESTIONS[:3]]  # different lengths: left padding inside the batch
    with torch.inference_mode():
        start = method.prepare(questions, DecodingConfig(max_new_tokens=4))
    state = load_file(str(fusers["mixed"] / FUSER_WEIGHTS))
    receiver, sharer = method.backbone, method.sharer
    width = start.trace.length
    changed = 0
    for row, question in enumerate(questions):
        prompt = method.final_prompt(question)
        assert start.prompts[row] == prompt[-1:]  # the last prompt token reads the fused cache
        context = torch.tensor([prompt[:-1]])
        with torch.no_grad():
            own = receiver.model(input_ids=context, use_cache=True).past_key_values
            shared = sharer.model(input_ids=context, use_cache=True).past_key_values
        real = slice(width - len(prompt) + 1, width)
        for layer in range(2):
            source = 1 + layer  # last aligned: receiver layer t (of 2) reads sharer layer t + 1 (of 3)
            for kind, is_open in (("key", layer == 0), ("value", layer == 1)):
                mine = own.layers[layer].keys if kind == "key" else own.layers[layer].values
                theirs = shared.layers[source].keys if kind == "key" else shared.layers[source].values
                fused = getattr(start.trace.cache.layers[layer], "keys" if kind == "key" else "values")[row, :, real]
                expected = (
                    _reference_stack(state, f"layers.{layer}.{kind}", 2, theirs[0], mine[0]) if is_open else mine[0]
                )
                torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
                changed += is_open and (fused - mine[0]).abs().max() > 1e-2
    assert changed == 2 * len(questions)  # the open gates really change the cache


def test_closed_gates_are_the_receiver_alone_exactly(tiny_model_dir, sharer_dir, fusers, tmp_path):
    gen, mc = _generate_requests(), _mc_requests()
    closed = _run_requests(
        _fresh("c2c", tmp_path / "closed", batch_size=2, **_c2c_args(tiny_model_dir, sharer_dir, fusers["closed"])),
        gen,
        mc,
    )
    alone = _run_requests(
        _fresh(
            "c2c",
            tmp_path / "none",
            batch_size=2,
            **_c2c_args(tiny_model_dir, sharer_dir, fusers["open"], communication="none"),
        ),
        gen,
        mc,
    )
    assert closed == alone  # outputs and log-likelihoods, bit for bit
    single = _run_requests(
        _fresh("single-agent", tmp_path / "single", batch_size=2, pretrained=str(tiny_model_dir)), gen, mc
    )
    assert closed[0] == single[0]  # the split prompt decodes as the single agent's prompt
    assert [s for s, _ in closed[1]] == pytest.approx([s for s, _ in single[1]], rel=1e-5, abs=1e-5)
    fused = _run_requests(
        _fresh("c2c", tmp_path / "open", batch_size=2, **_c2c_args(tiny_model_dir, sharer_dir, fusers["open"])), gen, mc
    )
    assert fused[0] != closed[0] and fused[1] != closed[1]  # open gates change what the receiver says


def test_batch_1_equals_batch_n(tiny_model_dir, sharer_dir, fusers, tmp_path):
    gen, mc = _generate_requests(), _mc_requests()
    args = _c2c_args(tiny_model_dir, sharer_dir, fusers["open"])
    one = _run_requests(_fresh("c2c", tmp_path / "b1", batch_size=1, **args), gen, mc)
    many = _run_requests(_fresh("c2c", tmp_path / "b4", batch_size=4, **args), gen, mc)
    assert one[0] == many[0] and len(set(one[0])) > 1
    assert [s for s, _ in one[1]] == pytest.approx([s for s, _ in many[1]], rel=1e-5, abs=1e-5)
    assert [g for _, g in one[1]] == [g for _, g in many[1]]


@pytest.mark.parametrize("communication", ["fused", "other_doc"])
def test_bf16_batch_1_equals_batch_n_bit_for_bit_with_batch_invariant(
    tiny_model_dir, sharer_dir, fusers, tmp_path, communication
):
    """Issue 18 for C2C: in bf16 with the mode on, batch 1, 3 and 4 (fresh backends) give identical bits."""
    gen, mc = _generate_requests(), _mc_requests()
    args = _c2c_args(tiny_model_dir, sharer_dir, fusers["open"], communication=communication, batch_invariant=True)
    runs = [
        _run_requests(_fresh("c2c", tmp_path / f"b{b}", dtype="bfloat16", batch_size=b, **args), gen, mc)
        for b in (1, 3, 4)
    ]
    assert runs[0] == runs[1] == runs[2] and len(set(runs[0][0])) > 1
    if communication == "fused":  # the first document beside other neighbours (other_doc's partner would change)
        batch = [QUESTIONS[0], *(item["question"] for item in ITEMS[:3])]
        lm = _fresh("c2c", tmp_path / "mixed", dtype="bfloat16", batch_size=4, **args)
        outputs, scores = _run_requests(lm, _generate_requests(batch), _mc_requests(batch))
        assert outputs[0] == runs[0][0][0] and scores[:4] == runs[0][1][:4]


def test_other_doc_fuses_the_partner_documents_sharer_cache(tiny_model_dir, sharer_dir, fusers):
    args = _c2c_args(tiny_model_dir, sharer_dir, fusers["open"], dtype="float32")
    method = C2C.load(C2C.config_class(**args, communication="other_doc"), "cpu")
    questions = [
        Question(QUESTIONS[0], "letter", trace_text=QUESTIONS[1]),
        Question(QUESTIONS[1], "letter", 0, QUESTIONS[0]),
    ]
    with torch.inference_mode():
        start = method.prepare(questions, DecodingConfig(max_new_tokens=4))
        contexts = [method.final_prompt(q)[:-1] for q in questions]
        partners = [method.final_prompt(Question(q.trace_text, "letter"))[:-1] for q in questions]
        expected, _ = method.fused_trace(
            contexts, [fit_length(p, len(c)) for p, c in zip(partners, contexts, strict=True)]
        )
        own, _ = method.fused_trace(contexts, contexts)
    for mine, theirs, fused in zip(start.trace.cache.layers, expected.cache.layers, own.cache.layers, strict=True):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
        assert not torch.equal(mine.keys, fused.keys)
    assert fit_length([1, 2, 3], 7) == [1, 2, 3, 1, 2, 3, 1] and fit_length([1, 2, 3], 2) == [1, 2]
    assert [a.role for a in start.agents[0]] == ["sharer", "receiver"]


def test_accounting_adds_the_sharer_tokens_and_the_fuser_cost(tiny_model_dir, sharer_dir, fusers, tmp_path):
    lm = _fresh("c2c", tmp_path / "acc", batch_size=2, **_c2c_args(tiny_model_dir, sharer_dir, fusers["open"]))
    lm.loglikelihood(_mc_requests(QUESTIONS[:2]), disable_tqdm=True)
    info = lm.get_model_info()["diffmas"]
    prompts = [lm.method.final_prompt(Question(q, "letter")) for q in QUESTIONS[:2]]
    totals = info["totals"]
    assert totals["sharer_prompt_tokens"] == sum(len(p) - 1 for p in prompts)
    assert totals["prompt_tokens"] == sum(2 * len(p) - 1 for p in prompts)  # receiver's prompt + sharer's context
    assert totals["trace_tokens"] == sum(len(p) - 1 for p in prompts)
    assert totals["fuser_seconds"] > 0 and totals["fuser_flops"] == lm.method.fuser.flops_per_token() * sum(
        len(p) - 1 for p in prompts
    )
    assert info["method"] == "c2c" and info["communication"] == "fused" and info["sharer"] == str(sharer_dir)
    assert set(info["backbones"]) == {"receiver", "sharer"} and info["fuser_fingerprint"]
    record = json.loads((tmp_path / "acc" / "sidecar.jsonl").read_text().splitlines()[0])
    assert record["extra"]["sharer_prompt_tokens"] > 0 and record["extra"]["fuser_flops"] > 0


# --- refusals ---


@pytest.fixture
def no_weights(monkeypatch):
    """Loading any model's weights fails the test: the error under test must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr("diffmas_eval.methods.base.load_backbone", refuse)


def test_bad_args_fail_before_any_weights_load(tiny_model_dir, sharer_dir, fusers, tmp_path, no_weights):
    c2c = backend_class("c2c")
    with pytest.raises(ValueError, match="needs fuser=DIR"):
        c2c(pretrained=str(tiny_model_dir), sharer=str(sharer_dir))
    with pytest.raises(FileNotFoundError, match="not a trained-artefact directory"):
        c2c(**_c2c_args(tiny_model_dir, sharer_dir, tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown communication"):
        c2c(**_c2c_args(tiny_model_dir, sharer_dir, fusers["open"], communication="trace"))
    with pytest.raises(ValueError, match="did you mean 'fuser'"):
        c2c(pretrained=str(tiny_model_dir), fusr=str(fusers["open"]))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    write_manifest(adapter, {"method": "diffmas", "backbones": {}})
    with pytest.raises(ValueError, match="needs one trained by c2c"):
        c2c(**_c2c_args(tiny_model_dir, sharer_dir, adapter))
    other_vocab = build_tiny_sharer(tmp_path / "other-vocab", extra_token=True)
    with pytest.raises(ValueError, match="another tokenizer"):
        c2c(**_c2c_args(tiny_model_dir, other_vocab, fusers["open"]))


def test_a_fuser_for_another_pair_is_refused(tiny_model_dir, tiny_untied_model_dir, sharer_dir, fusers):
    c2c = backend_class("c2c")
    with pytest.raises(ValueError, match="fingerprint"):  # same shapes, other weights
        c2c(dtype="float32", device="cpu", **_c2c_args(tiny_untied_model_dir, sharer_dir, fusers["open"]))
    with pytest.raises(ValueError, match="fingerprint"):  # receiver and sharer swapped
        c2c(dtype="float32", device="cpu", **_c2c_args(sharer_dir, tiny_model_dir, fusers["open"]))
    with pytest.raises(ValueError, match="holds a 'c2c' artefact"):  # and a fuser is not a LoRA adapter
        backend_class("diffmas")(pretrained=str(tiny_model_dir), adapter=str(fusers["open"]))


# --- training ---


def _train_config(tmp_path, receiver, sharer, data, name="out", **overrides):
    settings = {
        "output_dir": str(tmp_path / name),
        "method": "c2c",
        "pretrained": str(receiver),
        **({"sharer": str(sharer)} if sharer is not None else {}),
        "data": [str(data)],
        "dtype": "float32",
        "device": "cpu",
        "max_steps": 2,
        "per_device_batch_size": 4,
        "learning_rate": 1e-2,
        "append_eos": False,
        "progress": False,
        "checkpoint_every": 1,
        **SIZES,
    }
    return build_config({**settings, **overrides})


def _objective(config):
    from diffmas_eval.training.c2c import C2CObjective
    from diffmas_eval.training.data import prepare_items

    objective = C2CObjective(config, "cpu")
    items, _ = prepare_items(config.data, None, None, decontaminate_items=False, max_items=None, seed=0)
    return objective, objective.encode(items)


def test_gradients_reach_only_the_fuser(tmp_path, tiny_model_dir, sharer_dir, data_file):
    objective, examples = _objective(_train_config(tmp_path, tiny_model_dir, sharer_dir, data_file))
    trainable = objective.trainable()
    objective.train_mode()
    objective.on_step(1, 10)
    objective.loss(examples[:4]).backward()
    assert {name.removeprefix("fuser.") for name, _ in trainable} == set(
        dict(objective.method.fuser.named_parameters())
    )
    for name, param in trainable:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for role, backbone in objective.backbones().items():
        for name, param in backbone.model.named_parameters():
            assert not param.requires_grad and param.grad is None, f"{role} {name}"


def test_training_moves_the_fuser_only_and_its_loss_is_the_backend_nll(tmp_path, tiny_model_dir, sharer_dir, data_file):
    receiver = load_backbone(str(tiny_model_dir), dtype="float32", device="cpu")
    before = receiver.fingerprint
    output = train(_train_config(tmp_path, tiny_model_dir, sharer_dir, data_file, max_steps=3), backbone=receiver)
    from diffmas_eval.core.backbone import model_fingerprint

    assert model_fingerprint(receiver.model) == before
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["method"] == "c2c" and set(manifest["backbones"]) == {"receiver", "sharer"}
    assert manifest["fuser"]["hidden_dim"] == 32 and manifest["fuser_parameters"] > 0
    trained = load_file(str(output / FUSER_WEIGHTS))
    loaded = C2CFuser.load(output).state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)
    torch.manual_seed(0)  # the config's seed: the fresh fuser the run started from
    init = C2CFuser(FuserConfig.from_dict(manifest["fuser"])).state_dict()
    assert [k for k in trained if torch.equal(init[k], trained[k])] == [], "every fuser weight moves"

    # The training loss with the trained fuser in eval mode is the backend's negative log-likelihood of the target.
    objective, examples = _objective(_train_config(tmp_path, tiny_model_dir, sharer_dir, data_file, name="x"))
    objective.trainable()
    objective.method.fuser.load_state_dict(trained)
    objective.method.fuser.eval()
    with torch.no_grad():
        losses = [float(objective.loss([ex])) for ex in examples[:3]]
    lm = _fresh("c2c", tmp_path / "eval", fuser=str(output))
    requests = [
        Instance("loglikelihood", {"answer_format": None}, (item["question"], item["target"]), 0, ("t", i, 1))
        for i, item in enumerate(ITEMS[:3])
    ]
    scores = lm.loglikelihood(requests, disable_tqdm=True)
    assert losses == pytest.approx([-s for s, _ in scores], abs=1e-4)


def _cli(args: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "diffmas_eval.training", *args], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_resume_through_the_cli_is_bit_identical(tmp_path, tiny_model_dir, sharer_dir, data_file):
    """`diffmas-train --method c2c` in two pieces (`--stop_after_steps`, then `--resume`) against one straight run,
    all three processes with the same environment (dropout and Gumbel noise draw from the checkpointed RNG)."""
    common = ["--method", "c2c", "--pretrained", str(tiny_model_dir), "--sharer", str(sharer_dir), "--data"]
    common += [str(data_file), "--dtype", "float32", "--device", "cpu", "--learning_rate", "1e-2", "--append_eos"]
    common += ["false", "--progress", "false", "--checkpoint_every", "1", "--max_steps", "4"]
    common += ["--per_device_batch_size", "3", "--weight_decay", "0.01"]
    common += [arg for key, value in SIZES.items() for arg in (f"--{key}", str(value))]
    _cli([*common, "--output_dir", str(tmp_path / "straight")])
    pieces = [*common, "--output_dir", str(tmp_path / "pieces")]
    _cli([*pieces, "--stop_after_steps", "2"])
    assert not (tmp_path / "pieces" / "manifest.json").exists()
    _cli([*pieces, "--resume"])
    a, b = load_file(str(tmp_path / "straight" / FUSER_WEIGHTS)), load_file(str(tmp_path / "pieces" / FUSER_WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "pieces" / TRAIN_LOG).read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_bad_training_settings_fail_before_loading(tmp_path, tiny_model_dir, sharer_dir, data_file, monkeypatch):
    monkeypatch.setattr("diffmas_eval.training.c2c.load_backbone", lambda *a, **k: pytest.fail("loaded weights"))
    with pytest.raises(ValueError, match="needs --sharer"):
        train(_train_config(tmp_path, tiny_model_dir, None, data_file))
    with pytest.raises(ValueError, match="ffn must be one of"):
        _train_config(tmp_path, tiny_model_dir, sharer_dir, data_file, ffn="relu")
    with pytest.raises(ValueError, match="did you mean 'hidden_dim'"):
        _train_config(tmp_path, tiny_model_dir, sharer_dir, data_file, hiden_dim=8)
    with pytest.raises(ValueError, match="no agents or adapters"):
        train(_train_config(tmp_path, tiny_model_dir, sharer_dir, data_file, latent_steps=2))


# --- the lm-eval command ---


def test_lm_eval_command_runs_c2c(tiny_model_dir, sharer_dir, fusers, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "4"}) + "\n" for q in QUESTIONS[:3]))
    (tmp_path / "toy_c2c_qa.yaml").write_text(
        "task: toy_c2c_qa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        "generation_kwargs:\n  until: []\n  max_gen_toks: 5\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    args = f"pretrained={tiny_model_dir},sharer={sharer_dir},fuser={fusers['open']},dtype=float32"
    command = [str(BIN / "lm_eval"), "--model", "c2c", "--model_args", args, "--tasks", "toy_c2c_qa"]
    command += ["--include_path", str(tmp_path), "--batch_size", "2", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    (results,) = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
    info = json.loads(Path(results).read_text())["config"]["diffmas"]
    assert info["method"] == "c2c" and info["totals"]["requests"] == 3 and info["totals"]["sharer_prompt_tokens"] > 0


# --- T2T: TextMAS with another model writing ---


def test_t2t_is_text_mas_with_the_sharer_writing(tiny_model_dir, sharer_dir, tmp_path):
    from diffmas_eval.methods.text_mas import TextMAS, TextMASConfig

    config = TextMASConfig(
        pretrained=str(tiny_model_dir),
        upstream_model=str(sharer_dir),
        topology="two_stage",
        max_new_tokens=6,
        dtype="float32",
    )
    method = TextMAS.load(config, "cpu")
    assert method.upstream_roles == ["background"] and set(method.backbones()) == {"backbone", "upstream"}
    questions = [Question(q, "letter", seed=1) for q in QUESTIONS[:3]]
    with torch.inference_mode():
        start = method.prepare(questions, DecodingConfig(max_new_tokens=6))
    sharer = load_backbone(str(sharer_dir), dtype="float32", device="cpu")
    for row, question in enumerate(questions):
        user = method.prompts.render("text_mas", "two_stage", "background", question.text)
        prompt = sharer.render_chat(user, system=method.system_prompt, enable_thinking=None)
        with torch.inference_mode():
            (own,) = generate(sharer, [prompt], None, DecodingConfig(max_new_tokens=6))
        (call,) = start.agents[row]
        assert call.role == "background" and call.text == own.text and call.prompt_tokens == len(prompt)
        judger_prompt = method.backbone.decode(start.prompts[row])
        assert f"[Background]:\n{own.text.strip()}\n" in judger_prompt  # the judger reads the sharer's text
    assert method.settings()["upstream_model"] == str(sharer_dir)
    with pytest.raises(ValueError, match="cannot be combined"):
        TextMASConfig(upstream_model=str(sharer_dir), adapter=str(tmp_path)).validate()
    lm = _fresh(
        "text-mas",
        tmp_path / "t2t",
        pretrained=str(tiny_model_dir),
        upstream_model=str(sharer_dir),
        topology="two_stage",
        max_new_tokens=4,
    )
    outputs = lm.generate_until(_generate_requests(QUESTIONS[:2], 4), disable_tqdm=True)
    assert len(outputs) == 2 and set(lm.get_model_info()["diffmas"]["backbones"]) == {"backbone", "upstream"}
