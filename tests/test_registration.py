"""Registration with lm-eval and the commands exactly as users type them (subprocesses, offline)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from diffmas_eval.lm_backend import prompt_hash

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOY_ROWS = [
    {"question": "What is 2+2?", "answer": "4", "answer_format": "boxed_number"},
    {
        "question": "Tom has 3 apples and buys 5 more. How many apples does he have?",
        "answer": "8",
        "answer_format": "boxed_number",
    },
    {"question": "A train goes 60 miles in 2 hours. How fast is it?", "answer": "30", "answer_format": "boxed_number"},
    {"question": "What is 10 minus 7?", "answer": "3", "answer_format": "boxed_number"},
]
TOY_TASK = """task: toy_qa
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
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def toy_task_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("toy_task")
    data = directory / "toy.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in TOY_ROWS))
    (directory / "toy_qa.yaml").write_text(TOY_TASK.format(data=data))
    return directory


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _run(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def _results(output: Path) -> tuple[dict, list[dict]]:
    (results_file,) = glob.glob(str(output / "**" / "results_*.json"), recursive=True)
    (samples_file,) = glob.glob(str(output / "**" / "samples_toy_qa_*.jsonl"), recursive=True)
    samples = [json.loads(line) for line in Path(samples_file).read_text().splitlines()]
    return json.loads(Path(results_file).read_text()), sorted(samples, key=lambda s: s["doc_id"])


def test_builtins_survive_and_registering_twice_is_harmless():
    from importlib.metadata import EntryPoint

    import lm_eval.api.registry as registry

    from diffmas_eval.registry import model_names, register_models

    register_models()
    register_models()
    for name in ("hf", "dummy", *model_names()):
        assert registry.get_model(name) is not None
    # A later lm-eval registers entry points itself; our registration must leave such a name alone.
    registry.model_registry._objs.pop("diffmas", None)
    registry.model_registry.register(
        "diffmas", target=EntryPoint("diffmas", "diffmas_eval.lm_backend:DiffMASLM", "lm_eval.models")
    )
    register_models()
    assert registry.get_model("diffmas").__name__ == "DiffMASLM"
    with pytest.raises(ValueError, match="Did you mean 'latent-mas'"):
        registry.get_model("latent-mass")


def test_entry_points_are_declared():
    from importlib.metadata import entry_points

    from diffmas_eval.lm_backend import backend_class
    from diffmas_eval.methods.registry import BUILTIN_MODULES, methods

    declared = {ep.name: ep for ep in entry_points(group="lm_eval.models") if ep.value.startswith("diffmas_eval.")}
    builtins = [name for name, cls in methods().items() if cls.__module__ in BUILTIN_MODULES]
    # The entry points (for lm-eval releases that discover them) name exactly the built-in methods' backends.
    assert sorted(declared) == sorted(builtins)
    for name, entry in declared.items():
        assert entry.load() is backend_class(name)


def test_importing_the_hook_does_not_import_lm_eval_or_torch():
    code = "import sys, diffmas_eval._hook; print('lm_eval' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True)
    assert out.stdout.split() == ["False", "False"]


def test_stock_lm_eval_command_finds_our_model(tiny_model_dir, toy_task_dir, tmp_path):
    """The editable install: `lm_eval --model latent-mas ...` exactly as a user types it."""
    output = tmp_path / "out"
    _run(
        [
            str(BIN / "lm_eval"),
            "--model",
            "latent-mas",
            "--model_args",
            f"pretrained={tiny_model_dir},dtype=float32,latent_steps=2",
            "--tasks",
            "toy_qa",
            "--include_path",
            str(toy_task_dir),
            "--batch_size",
            "2",
            "--output_path",
            str(output),
            "--log_samples",
        ],
        cwd=tmp_path,
    )
    results, samples = _results(output)
    assert results["config"]["diffmas"]["method"] == "latent-mas"
    assert len(samples) == len(TOY_ROWS)


def test_diffmas_eval_cli_end_to_end_writes_settings_and_token_counts(tiny_model_dir, toy_task_dir, tmp_path):
    output = tmp_path / "out"
    _run(
        [
            str(BIN / "diffmas-eval"),
            "--model",
            "text-mas",
            "--model_args",
            f"pretrained={tiny_model_dir},dtype=float32,max_new_tokens=4,topology=hierarchical",
            "--tasks",
            "toy_qa",
            "--include_path",
            str(toy_task_dir),
            "--batch_size",
            "3",
            "--output_path",
            str(output),
            "--log_samples",
        ],
        cwd=tmp_path,
    )
    results, samples = _results(output)
    info = results["config"]["diffmas"]
    assert info["method"] == "text-mas" and info["topology"] == "hierarchical" and info["max_new_tokens"] == 4
    assert info["totals"]["requests"] == len(TOY_ROWS)
    assert info["totals"]["generated_tokens"] > info["totals"]["final_generated_tokens"] > 0
    # The CLI put the side-car beside the results and recorded it relative to the results file (no machine paths).
    (results_file,) = glob.glob(str(output / "**" / "results_*.json"), recursive=True)
    assert not Path(info["sidecar"]).is_absolute()
    sidecar_path = (Path(results_file).parent / info["sidecar"]).resolve()
    assert sidecar_path.parent.parent == output.resolve()
    sidecar = [json.loads(line) for line in sidecar_path.read_text().splitlines()]
    assert {line["prompt_hash"] for line in sidecar} == {s["prompt_hash"] for s in samples}
    assert {prompt_hash(row["question"]) for row in TOY_ROWS} == {s["prompt_hash"] for s in samples}
    assert all(len(line["agents"]) == 3 for line in sidecar)


def test_diffmas_eval_lists_project_tasks():
    out = _run([str(BIN / "diffmas-eval"), "ls", "tasks"], cwd=REPO)
    for name in ("mas_gsm8k", "mas_arc_easy_mc", "mas_all"):
        assert name in out.stdout


def test_data_parallel_two_processes_match_one(tiny_model_dir, toy_task_dir, tmp_path):
    common = [
        "--model",
        "latent-mas",
        "--model_args",
        f"pretrained={tiny_model_dir},dtype=float32,latent_steps=2",
        "--tasks",
        "toy_qa",
        "--include_path",
        str(toy_task_dir),
        "--batch_size",
        "2",
        "--log_samples",
    ]
    _run([sys.executable, "-m", "lm_eval", *common, "--output_path", str(tmp_path / "one")], cwd=tmp_path)
    # accelerate's multi-process launcher (torchrun underneath); on a machine without CUDA the backend asks
    # accelerate for a CPU (gloo) process group.
    _run(
        [
            str(BIN / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "lm_eval",
            *common,
            "--output_path",
            str(tmp_path / "two"),
        ],
        cwd=tmp_path,
    )
    one, samples_one = _results(tmp_path / "one")
    two, samples_two = _results(tmp_path / "two")
    assert two["config"]["diffmas"]["world_size"] == 2
    assert [s["resps"] for s in samples_one] == [s["resps"] for s in samples_two]
    # Cost covers every process, not rank 0 only: the totals and the side-cars the report reads.
    totals_one, totals_two = one["config"]["diffmas"]["totals"], two["config"]["diffmas"]["totals"]
    counts = [k for k in totals_one if k not in ("wall_seconds", "reused_requests")]
    assert counts and {k: totals_two[k] for k in counts} == {k: totals_one[k] for k in counts}
    sidecars = two["config"]["diffmas"]["sidecars"]
    assert len(sidecars) == 2
    lines = [json.loads(line) for path in sidecars for line in Path(path).read_text().splitlines()]
    assert sorted(line["doc_id"] for line in lines) == list(range(len(TOY_ROWS)))


@pytest.mark.slow
def test_wheel_install_registers_through_the_start_up_hook(tiny_model_dir, toy_task_dir, tmp_path):
    """Build the wheel, install it into a fresh environment, and run the stock `python -m lm_eval` there."""
    wheels = tmp_path / "wheels"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("diffmas_eval-*.whl")
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    site = Path(sysconfig.get_paths(vars={"base": str(env_dir), "platbase": str(env_dir)})["purelib"])
    # The fresh environment sees this one's dependencies (a plain path entry: their .pth files, including the
    # editable install's, are not processed), and gets diffmas-eval only from the wheel.
    (site / "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)], cwd=tmp_path)
    python = env_dir / "bin" / "python"
    where = _run(
        [str(python), "-c", "import diffmas_eval.paths as p; print(p.__file__); print(p.tasks_dir())"], cwd=tmp_path
    ).stdout.split()
    assert where[0].startswith(str(site)) and where[1] == str(site / "diffmas_eval" / "_tasks")
    output = tmp_path / "out"
    _run(
        [
            str(python),
            "-m",
            "lm_eval",
            "--model",
            "single-agent",
            "--model_args",
            f"pretrained={tiny_model_dir},dtype=float32",
            "--tasks",
            "toy_qa",
            "--include_path",
            str(toy_task_dir),
            "--output_path",
            str(output),
            "--log_samples",
        ],
        cwd=tmp_path,
    )
    results, _ = _results(output)
    assert results["config"]["diffmas"]["method"] == "single-agent"
