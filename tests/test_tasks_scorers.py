"""The `process_results` scorers of tasks/utils.py, one table row per task family, on realistic replies."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from diffmas_eval.paths import tasks_dir

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def utils():
    spec = importlib.util.spec_from_file_location("mas_task_utils", tasks_dir() / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHOICE_DOC = {"letters": "ABCDE", "gold": "E"}


@pytest.mark.parametrize(
    ("scorer", "doc", "reply", "expected"),
    [
        ("score_boxed_number", {"answer": "1500"}, "So \\boxed{1,500} cups.", {"acc": 1, "extracted": 1}),
        (
            "score_boxed_number",
            {"answer": "1500"},
            "<think>\\boxed{1500}</think>I am unsure",
            {"acc": 0, "extracted": 0},
        ),
        ("score_boxed_number", {"answer": "8"}, "8 apples, wait, \\boxed{7}", {"acc": 0, "extracted": 1}),
        ("score_integer", {"answer": "9"}, "The remainder is \\boxed{009}", {"acc": 1, "extracted": 1}),
        ("score_integer", {"answer": "9"}, "\\boxed{9.5}", {"acc": 0, "extracted": 1}),
        ("score_boxed_expression", {"answer": "\\frac{3}{4}"}, "\\boxed{0.75}", {"acc": 1, "extracted": 1}),
        (
            "score_boxed_expression",
            {"answer": "\\left( 2, \\frac{\\pi}{2} \\right)"},
            "Thus \\fbox{(2,\\frac{\\pi}{2})}",
            {"acc": 1, "extracted": 1},
        ),
        ("score_boxed_expression", {"answer": "\\frac{3}{4}"}, "no idea", {"acc": 0, "extracted": 0}),
        ("score_boxed_letter", CHOICE_DOC, "The answer is \\boxed{\\text{E}}", {"acc": 1, "extracted": 1}),
        ("score_boxed_letter", CHOICE_DOC, "answer: e", {"acc": 1, "extracted": 1}),
        ("score_boxed_letter", CHOICE_DOC, "\\boxed{B}", {"acc": 0, "extracted": 1}),
        ("score_boxed_letter", {"letters": "ABCD", "gold": "A"}, "\\boxed{E}", {"acc": 0, "extracted": 0}),
    ],
)
def test_scorers(utils, scorer, doc, reply, expected):
    assert getattr(utils, scorer)(doc, [reply]) == expected


def test_code_scorer(utils, monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(FIXTURES))
    monkeypatch.setenv("DIFFMAS_CACHE_DIR", str(tmp_path))
    doc = {"task_id": "Mbpp/9001", "entry_point": "square", "dataset": "mbpp"}
    reply = "Here you go:\n```python\ndef square(x):\n    return x ** 2\n```\nUsage:\n```python\nprint(square(3))\n```"
    assert utils.score_code(doc, [reply]) == {"pass_base": 1, "pass_plus": 1, "extracted": 1}
    assert utils.score_code(doc, [""]) == {"pass_base": 0, "pass_plus": 0, "extracted": 0}


def test_mc_helpers_and_formats(utils):
    import datasets

    doc = {"letters": "ABC", "gold": "C"}
    assert utils.letter_choices(doc) == ["A", "B", "C"] and utils.gold_index(doc) == 2
    docs = utils.letter_docs(datasets.Dataset.from_list([doc]))
    assert docs[0]["answer_format"] == "letter" and docs[0]["gold"] == "C"
