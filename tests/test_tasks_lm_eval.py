"""The mas_* task configs through lm-eval itself: listed, loaded from fixture data, run with lm-eval's `hf` backend
over the tiny model (one run covering every domain, both request types and the code scorer)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from diffmas_eval.paths import tasks_dir

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
LETTER_TASKS = ["gpqa_diamond", "arc_easy", "arc_challenge", "medqa", "commonsenseqa", "openbookqa"]
TASKS = (
    [f"mas_{name}" for name in ["gsm8k", "math500", "aime24", "aime25", "humaneval_plus", "mbpp_plus"]]
    + [f"mas_{name}" for name in LETTER_TASKS]
    + [f"mas_{name}_mc" for name in LETTER_TASKS]
)
GROUPS = ["mas_math", "mas_science", "mas_code", "mas_commonsense", "mas_all", "mas_mc"]


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks_dir()), include_defaults=False)


def test_every_task_and_group_is_listed(task_manager):
    assert set(TASKS) <= set(task_manager.all_subtasks)
    assert set(GROUPS) <= set(task_manager.all_groups)


def test_representative_run_with_the_hf_backend(task_manager, tiny_model_dir, tmp_path, monkeypatch):
    """One lm-eval run over fixture data: math (number and expression), science (generative letter), commonsense
    (loglikelihood letter) and code; metrics carry stderr, docs carry answer_format, contexts are bare problems."""
    import lm_eval

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(FIXTURES))
    monkeypatch.setenv("DIFFMAS_CACHE_DIR", str(tmp_path / "cache"))
    tasks = ["mas_gsm8k", "mas_math500", "mas_arc_challenge", "mas_openbookqa_mc", "mas_humaneval_plus"]
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tiny_model_dir}",
        tasks=tasks,
        task_manager=task_manager,
        limit=2,
        gen_kwargs="max_gen_toks=8",
        log_samples=True,
        confirm_run_unsafe_code=True,
        device="cpu",
    )
    metrics = {
        "mas_gsm8k": ["acc", "extracted"],
        "mas_math500": ["acc", "extracted"],
        "mas_arc_challenge": ["acc", "extracted"],
        "mas_openbookqa_mc": ["acc"],
        "mas_humaneval_plus": ["pass_base", "pass_plus", "extracted"],
    }
    formats = {
        "mas_gsm8k": "boxed_number",
        "mas_math500": "boxed_expression",
        "mas_arc_challenge": "boxed_letter",
        "mas_openbookqa_mc": "letter",
        "mas_humaneval_plus": "python_function",
    }
    for task, names in metrics.items():
        for name in names:
            assert 0.0 <= results["results"][task][f"{name},none"] <= 1.0
            assert f"{name}_stderr,none" in results["results"][task]
        samples = results["samples"][task]
        assert len(samples) == 2
        assert all(sample["doc"]["answer_format"] == formats[task] for sample in samples)
    first_gsm8k = results["samples"]["mas_gsm8k"][0]
    assert first_gsm8k["arguments"][0][0] == "Tom has 3 boxes with 4 pens each. How many pens does he have?"
    assert first_gsm8k["arguments"][0][1]["until"] == [] and "answer_format" not in first_gsm8k["arguments"][0][1]
    assert first_gsm8k["prompt_hash"] == hashlib.sha256(first_gsm8k["arguments"][0][0].encode()).hexdigest()
    mc = results["samples"]["mas_openbookqa_mc"][0]
    assert [argument[1] for argument in mc["arguments"]] == ["A", "B", "C", "D"]
    assert mc["arguments"][0][0] == "A magnet attracts\nA. wood\nB. iron\nC. glass\nD. paper"
    assert results["samples"]["mas_humaneval_plus"][0]["arguments"][0][0].startswith("from typing import List")
