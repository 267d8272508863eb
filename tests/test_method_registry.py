"""A new method is one module: a toy method defined here, registered as a plugin, reaches every place that lists or
labels methods (lm-eval's `--model`, `diffmas-eval models`, results identity, the report) without editing any
other file; and the start object's `prompt_embeds` path decodes exactly as token ids do."""

from __future__ import annotations

import glob
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from lm_eval.api.instance import Instance

from diffmas_eval.methods.registry import PLUGIN_GROUP

BIN = Path(sys.executable).parent

# The whole method: its config, its models (the base class loads the one backbone), what the final agent starts from.
TOY_METHOD = '''
from dataclasses import dataclass

from diffmas_eval.methods.base import FinalAgentStart, Method, MethodConfig
from diffmas_eval.methods.registry import register_method
from diffmas_eval.settings import setting


@dataclass
class ToyConfig(MethodConfig):
    embed_scale: float = setting("Scale of the final agent's prompt embeddings (1.0: the single agent).", 1.0)


@register_method
class Toy(Method):
    """The single agent, its prompt handed over as input embeddings."""

    name = "toy"
    family = "single_agent"
    config_class = ToyConfig
    description = "toy method of the registry test"
    default_communication = "none"

    @property
    def upstream_roles(self):
        return []

    def prepare(self, questions, decoding):
        prompts = [self.final_prompt(q) for q in questions]
        embed = self.backbone.causal_lm.get_input_embeddings()
        ids = [self.backbone.input_embeddings.new_tensor(p).long() for p in prompts]
        embeds = [embed(i) * self.config.embed_scale for i in ids]
        return FinalAgentStart(prompts=prompts, trace=None, agents=[[] for _ in questions], prompt_embeds=embeds)
'''

TOY_TASK = """task: toy_registry_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: []
  max_gen_toks: 5
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    """A directory holding the toy module and a dist-info declaring it in the `diffmas_eval.methods` group, as an
    installed third-party package would."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "toy_method.py").write_text(TOY_METHOD)
    info = root / "toy_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{PLUGIN_GROUP}]\ntoy = toy_method\n")
    return root


def _env(plugin_dir: Path) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(plugin_dir))
    return env


def _run(command: list[str], cwd: Path, plugin_dir: Path) -> str:
    result = subprocess.run(command, cwd=cwd, env=_env(plugin_dir), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout


def test_toy_method_reaches_lm_eval_the_models_listing_and_the_report(plugin_dir, tiny_model_dir, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "4"}) + "\n" for q in ("What is 2+2?", "And 3+1?")))
    (tmp_path / "toy_registry_qa.yaml").write_text(TOY_TASK.format(data=data))
    output = tmp_path / "out"
    _run(
        [
            str(BIN / "lm_eval"),
            "--model",
            "toy",
            "--model_args",
            f"pretrained={tiny_model_dir},dtype=float32,embed_scale=1.0",
            "--tasks",
            "toy_registry_qa",
            "--include_path",
            str(tmp_path),
            "--output_path",
            str(output),
        ],
        tmp_path,
        plugin_dir,
    )
    (results_file,) = glob.glob(str(output / "**" / "results_*.json"), recursive=True)
    info = json.loads(Path(results_file).read_text())["config"]["diffmas"]
    assert info["method"] == "toy" and info["embed_scale"] == 1.0 and info["totals"]["requests"] == 2

    listing = _run([str(BIN / "diffmas-eval"), "models"], tmp_path, plugin_dir)
    assert "toy: toy method of the registry test" in listing
    assert "embed_scale (float, default 1.0)" in listing

    _run([str(BIN / "diffmas-report"), str(output), "--out", str(tmp_path / "report")], tmp_path, plugin_dir)
    report = (tmp_path / "report" / "report.md").read_text()
    assert re.search(r"^\|\s*method\s*\|\s*toy\s*\|", report, flags=re.MULTILINE)  # its own row, kind "method"

    # A misspelt model arg of the plugin is refused before any weights load, with a suggestion.
    result = subprocess.run(
        [str(BIN / "lm_eval"), "--model", "toy", "--model_args", "embed_scal=2", "--tasks", "toy_registry_qa"]
        + ["--include_path", str(tmp_path)],
        cwd=tmp_path,
        env=_env(plugin_dir),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0 and "did you mean 'embed_scale'" in result.stderr


def test_prompt_embeds_decode_and_score_as_token_ids(plugin_dir, tiny_model_dir, tmp_path, monkeypatch):
    """The start object's input-embedding path (Interlat's message) against the token-id path, fresh backends."""
    monkeypatch.syspath_prepend(str(plugin_dir))
    import toy_method  # noqa: F401  (registers `toy` in this process)

    from diffmas_eval.lm_backend import backend_class

    questions = ["What is 2+2?", "Tom has 3 apples and buys 5 more apples. How many apples?", "Is water a cell?"]
    gen = [
        Instance(
            "generate_until", {"answer_format": "boxed_number"}, (q, {"until": [], "max_gen_toks": 8}), 0, ("t", i, 1)
        )
        for i, q in enumerate(questions)
    ]
    mc = [
        Instance("loglikelihood", {"answer_format": "letter"}, (q, c), k, ("t_mc", i, 1))
        for i, q in enumerate(questions)
        for k, c in enumerate(" A B C".split(" ")[1:])
    ]
    outputs = {}
    for name in ("single-agent", "toy"):
        (tmp_path / name).mkdir()
        lm = backend_class(name)(
            pretrained=str(tiny_model_dir),
            dtype="float32",
            device="cpu",
            batch_size=3,
            sidecar=str(tmp_path / name / "s.jsonl"),
        )
        outputs[name] = (lm.generate_until(gen, disable_tqdm=True), lm.loglikelihood(mc, disable_tqdm=True))
        assert lm.get_model_info()["diffmas"]["totals"].get("reused_requests", 0) == 0
    assert outputs["toy"][0] == outputs["single-agent"][0]
    toy_scores, single_scores = outputs["toy"][1], outputs["single-agent"][1]
    assert [s for s, _ in toy_scores] == pytest.approx([s for s, _ in single_scores], abs=1e-4)
    assert [g for _, g in toy_scores] == [g for _, g in single_scores]
    (tmp_path / "scaled").mkdir()
    scaled = backend_class("toy")(
        pretrained=str(tiny_model_dir),
        dtype="float32",
        device="cpu",
        embed_scale=3.0,
        sidecar=str(tmp_path / "scaled" / "s.jsonl"),
    )
    assert scaled.loglikelihood(mc, disable_tqdm=True) != outputs["toy"][1]  # the embeddings are what is read
