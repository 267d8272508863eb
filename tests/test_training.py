"""DiffMAS training (issue 4) on the tiny model: no-op init, only LoRA moves, coupling gradients, loss = backend NLL,
learning, resume, 2 processes = 1 process, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lm_eval.api.instance import Instance
from safetensors.torch import load_file

from diffmas_eval.core.backbone import load_backbone
from diffmas_eval.lm_backend import DiffMASLM, SingleAgentLM
from diffmas_eval.methods.adapter import attach_adapter
from diffmas_eval.training.config import TrainConfig, build_config, parse_args
from diffmas_eval.training.data import prepare_items
from diffmas_eval.training.lora import attach_lora
from diffmas_eval.training.trace_nll import build_loss, build_method
from diffmas_eval.training.trainer import TRAIN_LOG, train
from diffmas_eval.training.unroll import TraceLoss, encode_items

FIXTURE_DATA = Path(__file__).resolve().parent / "fixtures" / "data"
ITEMS = [
    {"question": f"Question {i}: is the {['plant', 'cell', 'book', 'train'][i % 4]} green?", "target": t}
    for i, t in enumerate(["yes", "no", "no", "yes", "yes", "no", "yes", "no"])
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "toy.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    return path


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DIFFMAS_DATA_DIR", raising=False)


def make_config(tmp_path: Path, model: Path, data: Path, name: str = "out", **overrides):
    settings = {
        "output_dir": str(tmp_path / name),
        "pretrained": str(model),
        "data": [str(data)],
        "dtype": "float32",
        "device": "cpu",
        "max_steps": 2,
        "per_device_batch_size": 4,
        "learning_rate": 5e-2,
        "append_eos": False,
        "progress": False,
        "checkpoint_every": 1,
    }
    return build_config({**settings, **overrides})


def trainable_pieces(model: Path, data: Path, config):
    """Backbone, method, encoded examples and the loss, as the trainer builds them (no adapter yet)."""
    backbone = load_backbone(str(model), dtype="float32", device="cpu")
    method = build_method(backbone, config)
    items, _ = prepare_items(config.data, None, None, decontaminate_items=False, max_items=None, seed=0)
    examples = encode_items(backbone, method, items, append_eos=False)
    return backbone, method, examples


def fresh_lora(backbone, method, config):
    torch.manual_seed(config.seed)
    roles = [*method.upstream_roles, "judger"]
    return attach_lora(
        backbone,
        roles,
        per_role=config.adapters == "per_role",
        r=config.lora_r,
        alpha=config.lora_alpha,
        dropout=0.0,
        target_modules=config.lora_target_modules,
    )


@pytest.mark.parametrize("settings", [{"latent_steps": 0}, {"latent_steps": 2, "adapters": "per_role"}])
def test_fresh_adapter_is_exact_noop(tmp_path, tiny_model_dir, data_file, settings):
    config = make_config(tmp_path, tiny_model_dir, data_file, **settings)
    backbone, method, examples = trainable_pieces(tiny_model_dir, data_file, config)
    with torch.no_grad():
        plain = TraceLoss(
            backbone, method, latent_steps=config.latent_steps, per_role=False, frozen_trace=False, recompute=False
        )
        before = plain(examples)
        fresh_lora(backbone, method, config)
        after = build_loss(backbone, method, config)(examples)
    assert torch.equal(before, after)


@pytest.mark.parametrize("adapters", ["shared", "per_role"])
def test_training_moves_every_lora_weight_and_no_backbone_weight(tmp_path, tiny_model_dir, data_file, adapters):
    config = make_config(tmp_path, tiny_model_dir, data_file, latent_steps=1, adapters=adapters, max_steps=3)
    backbone = load_backbone(str(tiny_model_dir), dtype="float32", device="cpu")
    base = {name: p.detach().clone() for name, p in backbone.model.named_parameters()}
    reference, method, _ = trainable_pieces(tiny_model_dir, data_file, config)
    initial = {name: p.detach().clone() for name, p in fresh_lora(reference, method, config)}

    train(config, backbone=backbone)
    lora, frozen = 0, 0
    for name, param in backbone.model.named_parameters():
        if "lora_" in name:
            lora += 1
            assert not torch.equal(param, initial[name]), f"LoRA weight {name} did not change"
        else:
            frozen += 1
            original = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            assert torch.equal(param, base[original]), f"backbone weight {name} changed"
    assert lora == len(initial) and frozen == len(base)


def test_gradient_reaches_the_adapter_through_upstream_positions_only_when_coupled(tmp_path, tiny_model_dir, data_file):
    grads = {}
    for frozen in (False, True):
        config = make_config(
            tmp_path, tiny_model_dir, data_file, latent_steps=1, adapters="per_role", frozen_trace=frozen
        )
        backbone, method, examples = trainable_pieces(tiny_model_dir, data_file, config)
        trainable = fresh_lora(backbone, method, config)
        build_loss(backbone, method, config)(examples).sum().backward()
        grads[frozen] = {n: (p.grad.abs().sum().item() if p.grad is not None else 0.0) for n, p in trainable}
    planner = [n for n in grads[False] if ".planner." in n and "lora_B" in n]
    judger = [n for n in grads[False] if ".judger." in n and "lora_B" in n]
    assert planner and judger
    # The planner's adapter acts only at upstream positions: its gradient is the coupling, absent when frozen.
    assert all(grads[False][n] > 0 for n in planner)
    assert all(grads[True][n] == 0 for n in planner)
    assert all(grads[True][n] > 0 for n in judger)


def test_shared_adapter_coupled_gradient_exceeds_frozen_by_the_upstream_part(tmp_path, tiny_model_dir, data_file):
    flat = {}
    for frozen in (False, True):
        config = make_config(tmp_path, tiny_model_dir, data_file, latent_steps=0, frozen_trace=frozen)
        backbone, method, examples = trainable_pieces(tiny_model_dir, data_file, config)
        trainable = fresh_lora(backbone, method, config)
        loss = build_loss(backbone, method, config)
        assert loss.formulation == ("unroll" if frozen else "single_sequence")
        loss(examples).sum().backward()
        flat[frozen] = torch.cat([p.grad.flatten() for _, p in trainable])
    upstream_part = flat[False] - flat[True]
    assert upstream_part.abs().max() > 1e-6 * flat[False].abs().max()


def _backend_nll(lm, items) -> list[float]:
    requests = [
        Instance("loglikelihood", {"answer_format": None}, (item["question"], " " + item["target"]), i, ("toy", i, 1))
        for i, item in enumerate(items)
    ]
    return [-score for score, _ in lm.loglikelihood(requests, disable_tqdm=True)]


@pytest.mark.parametrize(
    "settings",
    [
        {"latent_steps": 0},
        {"latent_steps": 2},
        {"latent_steps": 1, "adapters": "per_role", "recompute": True},
        {"latent_steps": 0, "frozen_trace": True},
        {"method": "single-agent"},
    ],
)
def test_training_loss_equals_backend_negative_loglikelihood(tmp_path, tiny_model_dir, data_file, settings):
    config = make_config(tmp_path, tiny_model_dir, data_file, **settings)
    output = train(config)
    record = json.loads((output / "manifest.json").read_text())
    assert record["method"] == config.method and record["git_revision"] and record["config"]["data"]
    assert (
        record["backbones"]["backbone"]["fingerprint"]
        and record["steps"] == 2
        and record["data"]["counts"]["used"] == len(ITEMS)
    )
    if config.method == "single-agent":
        lm = SingleAgentLM(pretrained=str(tiny_model_dir), dtype="float32", device="cpu", batch_size=3)
        attach_adapter(lm.backbone, output)
    else:
        lm = DiffMASLM(
            pretrained=str(tiny_model_dir),
            dtype="float32",
            device="cpu",
            batch_size=3,
            adapter=str(output),
            latent_steps=config.latent_steps,
        )
    expected = _backend_nll(lm, ITEMS)
    # The training side renders its own prompts (the trainer's method), on the backend's adapted backbone.
    method = build_method(lm.backbone, config)
    items, _ = prepare_items(config.data, None, None, decontaminate_items=False, max_items=None, seed=0)
    examples = encode_items(lm.backbone, method, items, append_eos=False)
    with torch.no_grad():
        got = (
            build_loss(lm.backbone, method, config)(examples[:5]).tolist()
            + build_loss(lm.backbone, method, config)(examples[5:]).tolist()
        )
    assert got == pytest.approx(expected, abs=1e-4)
    assert max(expected) > 0


def test_loss_decreases_on_a_learnable_dataset(tmp_path, tiny_model_dir, data_file):
    config = make_config(tmp_path, tiny_model_dir, data_file, latent_steps=1, max_steps=25, learning_rate=1e-2)
    output = train(config)
    losses = [json.loads(line)["loss"] for line in (output / TRAIN_LOG).read_text().splitlines()]
    assert len(losses) == 25
    assert sum(losses[-3:]) / 3 < 0.3 * sum(losses[:3]) / 3


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path, tiny_model_dir, data_file):
    settings = {"latent_steps": 1, "max_steps": 4, "per_device_batch_size": 3, "weight_decay": 0.01}
    straight = train(make_config(tmp_path, tiny_model_dir, data_file, "straight", **settings))
    make_interrupted = make_config(tmp_path, tiny_model_dir, data_file, "pieces", stop_after_steps=2, **settings)
    pieces = train(make_interrupted)
    assert not (pieces / "manifest.json").exists()
    with pytest.raises(ValueError, match="--resume"):
        train(make_config(tmp_path, tiny_model_dir, data_file, "pieces", **settings))
    train(make_config(tmp_path, tiny_model_dir, data_file, "pieces", resume=True, **settings))
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(pieces / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (pieces / TRAIN_LOG).read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def _cli(args: list[str], launcher: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, "-m", "diffmas_eval.training", *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_match_one_process_on_the_combined_batch(tmp_path, tiny_model_dir, data_file):
    common = [
        "--pretrained",
        str(tiny_model_dir),
        "--data",
        str(data_file),
        "--dtype",
        "float32",
        "--max_steps",
        "2",
        "--latent_steps",
        "1",
        "--learning_rate",
        "5e-2",
        "--progress",
        "false",
    ]
    _cli([*common, "--output_dir", str(tmp_path / "one"), "--per_device_batch_size", "4"], [sys.executable])
    # torchrun is what `accelerate launch --multi_gpu --num_processes 2` runs; on a CPU-only machine they use gloo.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    _cli([*common, "--output_dir", str(tmp_path / "two"), "--per_device_batch_size", "2"], launcher)
    assert len((tmp_path / "two" / TRAIN_LOG).read_text().splitlines()) == 2  # only rank 0 logs
    one = load_file(tmp_path / "one" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=1e-4, rtol=1e-3)  # Adam after 2 steps at lr 5e-2
    assert any(not torch.equal(one[k], torch.zeros_like(one[k])) for k in one if "lora_B" in k)


def test_bad_input_fails_before_training(tmp_path, tiny_model_dir, data_file):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(make_config(tmp_path, tiny_model_dir, tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no training items"):
        train(make_config(tmp_path, tiny_model_dir, empty))
    with pytest.raises(ValueError, match="exceed max_length=40"):
        train(make_config(tmp_path, tiny_model_dir, data_file, max_length=40))
    with pytest.raises(ValueError, match="did you mean 'q_proj'"):
        train(make_config(tmp_path, tiny_model_dir, data_file, lora_target_modules=["q_prj"]))
    with pytest.raises(ValueError, match="unknown training source"):
        train(make_config(tmp_path, tiny_model_dir, Path("arc_easyy")))
    assert not (tmp_path / "out" / TRAIN_LOG).exists()


def test_config_from_yaml_with_command_line_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: /tmp/x\nlatent_steps: 4\ndata: [arc_easy, gsm8k]\nfrozen_trace: false\n")
    config = parse_args(
        ["--config", str(path), "--latent_steps", "8", "--frozen_trace", "--lora_target_modules", "q_proj,v_proj"]
    )
    assert (config.latent_steps, config.frozen_trace, config.data) == (8, True, ["arc_easy", "gsm8k"])
    assert config.lora_target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="did you mean 'latent_steps'"):
        build_config({"output_dir": "x", "latent_step": 3})
    with pytest.raises(ValueError, match="latent_steps must be int"):
        build_config({"output_dir": "x", "latent_steps": "many"})


def test_adapter_for_another_backbone_is_refused(tmp_path, tiny_model_dir, tiny_untied_model_dir, data_file):
    output = train(make_config(tmp_path, tiny_model_dir, data_file, max_steps=1))
    with pytest.raises(ValueError, match="fingerprint"):
        DiffMASLM(pretrained=str(tiny_untied_model_dir), dtype="float32", device="cpu", adapter=str(output))


def _arc_row(row_id: str, stem: str, options: list[str], gold: int) -> dict:
    choices = [{"text": text, "label": "ABCDE"[i]} for i, text in enumerate(options)]
    return {"id": row_id, "question": {"stem": stem, "choices": choices}, "answerKey": "ABCDE"[gold]}


def _mbpp_row(task_id: int, prompt: str, code: str, test: str) -> dict:
    return {"task_id": task_id, "prompt": prompt, "code": code, "test_list": [test]}


def _data_dir_with_train_splits(root: Path, splits: dict[str, list[dict]]) -> Path:
    """A data directory: the evaluation items of tests/fixtures/data plus the given train split files."""
    data = shutil.copytree(FIXTURE_DATA, root / "data")
    for relative, rows in splits.items():
        path = data / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return data


def test_decontamination_drops_evaluation_items(tmp_path, monkeypatch):
    """MBPP tasks that are MBPP+ tasks (by id, even reworded) and choice items that are evaluation items (same stem
    and options, in any order) are dropped; the same stem with other options is kept."""
    mbpp_train = [
        _mbpp_row(9001, "Write a function that returns the square of a number.", "def square(x): ...", "assert 1"),
        _mbpp_row(9100, "Write a function that adds one.", "def add_one(x):\n    return x + 1", "assert 1"),
    ]
    mbpp_prompt = [_mbpp_row(9002, "Reverse the list you are given.", "def reverse_list(x): ...", "assert 1")]
    stem = "Which of these is a liquid at room temperature?"  # fixture arc_easy fx-e1
    arc_train = [
        _arc_row("same-item-reordered", stem, ["sand", "water", "steam", "ice"], 1),
        _arc_row("same-stem-other-options", stem, ["mercury", "iron", "salt", "glass"], 0),
        _arc_row("new", "Which planet is closest to the sun?", ["Mercury", "Venus", "Earth", "Mars"], 0),
    ]
    splits = {"mbpp/sanitized_train.jsonl": mbpp_train, "mbpp/sanitized_prompt.jsonl": mbpp_prompt}
    data = _data_dir_with_train_splits(tmp_path, {**splits, "arc_easy/train.jsonl": arc_train})
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(data))
    items, report = prepare_items(["mbpp", "arc_easy"], None, None, decontaminate_items=True, max_items=None, seed=0)
    assert report.loaded == {"mbpp": 3, "arc_easy": 3}
    assert report.decontaminated == {"mbpp": 2, "arc_easy": 1}
    assert sorted(item.id for item in items) == ["Mbpp/9100", "new", "same-stem-other-options"]
    assert {"mbpp_plus", "arc_easy"} <= set(report.eval_sets_checked)


def test_decontamination_counts_on_the_full_copies(monkeypatch, shared_data_dir):
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(shared_data_dir))
    items, report = prepare_items(["mbpp"], None, None, decontaminate_items=True, max_items=None, seed=0)
    assert report.loaded == {"mbpp": 127}
    assert report.decontaminated == {"mbpp": 115}  # 108 of 120 train tasks and all 7 prompt tasks are in MBPP+
    assert len(items) == 12 and all(item.target.startswith("```python\n") for item in items)
    assert "mbpp_plus" in report.eval_sets_checked
    _, report = prepare_items(["arc_easy"], "letter", None, decontaminate_items=True, max_items=None, seed=0)
    assert report.decontaminated == {"arc_easy": 3}


def test_balanced_letters_are_uniform_and_keep_each_items_answer(tmp_path, monkeypatch):
    # A training set whose gold letter is always A (the prior balancing removes), with 3-, 4- and 5-option items.
    options = [["red", "blue", "green", "white", "black"][:n] for n in [4] * 10 + [3, 3, 5]]
    arc_train = [_arc_row(f"q{i}", f"Question {i}: which colour?", opts, 0) for i, opts in enumerate(options)]
    data = _data_dir_with_train_splits(tmp_path, {"arc_easy/train.jsonl": arc_train})
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(data))
    kwargs = {"decontaminate_items": True, "max_items": 12, "seed": 3}
    plain, _ = prepare_items(["arc_easy"], "letter", None, **kwargs)
    balanced, _ = prepare_items(["arc_easy"], "letter", None, balance=True, **kwargs)
    assert len(balanced) == 12 and all(item.target == "A" for item in plain)
    four = [item for item in balanced if len(item.choices[1]) == 4]
    counts = {letter: sum(item.target == letter for item in four) for letter in "ABCD"}
    assert max(counts.values()) - min(counts.values()) <= len(balanced) - len(four) + 1, counts
    for before, after in zip(plain, balanced, strict=True):
        (stem, options, gold), (stem_after, options_after, gold_after) = before.choices, after.choices
        assert before.id == after.id and stem == stem_after and sorted(options) == sorted(options_after)
        assert options_after[gold_after] == options[gold] and after.target == "ABCDE"[gold_after]
        assert f"{after.target}. {options[gold]}" in after.question.split("\n")


def test_per_source_cap_keeps_at_most_n_of_each_source_independently_of_the_others(tmp_path, monkeypatch):
    arc_train = [_arc_row(f"a{i}", f"ARC question {i}?", ["x", "y", "z", "w"], 0) for i in range(12)]
    obqa_train = [_arc_row(f"o{i}", f"OBQA question {i}?", ["x", "y", "z", "w"], 1) for i in range(3)]
    data = _data_dir_with_train_splits(
        tmp_path, {"arc_easy/train.jsonl": arc_train, "openbookqa/train.jsonl": obqa_train}
    )
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(data))
    kwargs = {"decontaminate_items": False, "max_items": None, "seed": 5, "max_per_source": 4}
    mixed, report = prepare_items(["arc_easy", "openbookqa"], None, None, **kwargs)
    assert report.capped == {"arc_easy": 4, "openbookqa": 3}
    assert report.as_dict()["kept_per_source_after_cap"] == {"arc_easy": 4, "openbookqa": 3}
    arc_ids = [item.id for item in mixed if item.source == "arc_easy"]
    assert len(arc_ids) == 4 and arc_ids != ["a0", "a1", "a2", "a3"]  # a seeded subset, not the head of the file
    assert [item.id for item in mixed if item.source == "openbookqa"] == ["o0", "o1", "o2"]
    alone, _ = prepare_items(["arc_easy"], None, None, **kwargs)  # another source does not move this one's subset
    assert [item.id for item in alone] == arc_ids
    other_seed, _ = prepare_items(["arc_easy"], None, None, **{**kwargs, "seed": 6})
    assert [item.id for item in other_seed] != arc_ids
    with pytest.raises(ValueError, match="max_items_per_source must be > 0"):
        TrainConfig(output_dir=str(tmp_path / "out"), max_items_per_source=0).validate()


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs" / "train").glob("*.yaml")), ids=str)
def test_every_committed_training_config_builds_and_validates(path, tmp_path, monkeypatch):
    """Names, types and values are checked; a config that starts from another run's artefact (Interlat's stage 2
    reads stage 1) gets the one clear missing-artefact error here, raised after everything else was checked."""
    monkeypatch.chdir(tmp_path)  # relative artefact paths resolve to nothing, on every machine alike
    values = yaml.safe_load(path.read_text())
    if any(isinstance(value, str) and value.startswith("runs/") for value in values.values()):
        with pytest.raises(FileNotFoundError, match="not a trained-artefact directory"):
            build_config({"output_dir": str(tmp_path / "out")}, path)
        return
    config = build_config({"output_dir": str(tmp_path / "out")}, path)
    assert config.output_dir == str(tmp_path / "out")
