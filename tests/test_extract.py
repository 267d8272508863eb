"""Table-driven tests of answer extraction and scoring against what real models write."""

from __future__ import annotations

import pytest

from diffmas_eval.benchmarks.extract import (
    extract_boxed_expression,
    extract_boxed_number,
    extract_code,
    extract_letter,
    find_boxed,
    strip_thinking,
)
from diffmas_eval.benchmarks.scoring import expressions_match, integers_match, letters_match, numbers_match


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>the answer is 7</think>The answer is 8", "The answer is 8"),
        ("reasoning the template opened</think>\n\nFinal: 3", "\n\nFinal: 3"),
        ("Sure.<think>cut off by the budget \\boxed{4}", "Sure."),
        ("<think>a</think>x<think>b</think>y", "xy"),
        ("no thinking at all", "no thinking at all"),
    ],
)
def test_strip_thinking(text, expected):
    assert strip_thinking(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{\\frac{1}{2}}", ["\\frac{1}{2}"]),
        ("\\boxed{1} then \\fbox{2} then \\boxed{3}", ["1", "2", "3"]),
        ("\\fbox{x} before \\boxed{y}", ["x", "y"]),
        ("\\boxed{a{b{c}}d}", ["a{b{c}}d"]),
        ("\\boxed 5 is it", ["5"]),
        ("unclosed \\boxed{12", []),
        ("", []),
    ],
)
def test_find_boxed(text, expected):
    assert find_boxed(text) == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("So she makes \\boxed{18} dollars.", "18"),
        ("\\boxed{\\$1,234.50}", "1234.50"),
        ("First \\boxed{3}, wait, actually \\boxed{5}.", "5"),
        ("\\boxed{18 \\text{ dollars}}", "18"),
        ("\\boxed{\\text{-7}}", "-7"),
        ("The total is \u22123 degrees", "-3"),
        ("\\fbox{42}", "42"),
        ("It costs $1,000 and then 250 more, so 1,250 in all.", "1250"),
        ("<think>maybe \\boxed{99}</think>The answer is \\boxed{100}", "100"),
        ("<think>long reasoning \\boxed{99} cut off", None),
        ("\\boxed{\\frac{3}{4}}", "3"),
        ("\\boxed{x}", "x"),
        ("no numbers here", None),
        ("", None),
        ("Answer: 0.5 of them", "0.5"),
        ("version v2 has 3 parts", "3"),
    ],
)
def test_extract_boxed_number(reply, expected):
    assert extract_boxed_number(reply) == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("so \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}} and later \\boxed{\\dfrac{1}{2}}", "\\dfrac{1}{2}"),
        ("no box, but the result is 14 or 15", "15"),
        ("<think>\\boxed{1}</think>", None),
        ("\\boxed{}", None),
    ],
)
def test_extract_boxed_expression(reply, expected):
    assert extract_boxed_expression(reply) == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("\\boxed{B}", "B"),
        ("\\boxed{\\text{C}}", "C"),
        ("\\boxed{\\textbf{(d)}}", "D"),
        ("\\boxed{(A) Hemolytic uremic syndrome}", "A"),
        ("\\boxed{A} no wait \\boxed{C}", "C"),
        ("The answer is (B).", "B"),
        ("answer: b", "B"),
        ("The correct answer is **D**", "D"),
        ("Final answer: Option C", "C"),
        ("B. Oral ulcers", "B"),
        ("(C)", "C"),
        ("C", "C"),
        ("I think (A) is wrong; (D) fits best", "D"),
        ("<think>The answer is A</think>The answer is B", "B"),
        ("The answer is a good question but unclear", None),
        ("A cat sat on the mat", None),
        ("\\boxed{F}", None),
        ("\\boxed{E}", "E"),
        ("nothing here", None),
        ("", None),
    ],
)
def test_extract_letter(reply, expected):
    assert extract_letter(reply, letters="ABCDE") == expected


def test_extract_letter_respects_valid_letters():
    assert extract_letter("\\boxed{E}", letters="ABCD") is None
    assert extract_letter("The answer is (E)", letters="ABCD") is None


@pytest.mark.parametrize(
    ("reply", "entry_point", "expected"),
    [
        ("```python\ndef f(x):\n    return x\n```", "f", "def f(x):\n    return x"),
        (
            "Here:\n```py\ndef g():\n    pass\n```\nand a test\n```python\nassert f(1) == 1\n```",
            "f",
            "assert f(1) == 1",
        ),
        (
            "```python\ndef f(x):\n    return 1\n```\nusage:\n```python\nprint(f(2))\n```",
            "f",
            "def f(x):\n    return 1",
        ),
        ("```\ndef f():\n    return 2\n```", "f", "def f():\n    return 2"),
        ("```python\ndef f():\n    return 3", "f", "def f():\n    return 3"),
        ("def f():\n    return 4\n", "f", "def f():\n    return 4"),
        (
            "<think>```python\ndef f(): return 0\n```</think>```python\ndef f():\n    return 5\n```",
            "f",
            "def f():\n    return 5",
        ),
        ("   ", "f", None),
        ("```text\nnot python\n```", None, "not python"),
    ],
)
def test_extract_code(reply, entry_point, expected):
    assert extract_code(reply, entry_point) == expected


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [
        ("18", "18", True),
        ("18.00", "18", True),
        ("1,000", "1000", True),
        ("$5", "5", True),
        ("17", "18", False),
        (None, "18", False),
        ("x", "18", False),
        ("-3", "-3", True),
    ],
)
def test_numbers_match(predicted, gold, expected):
    assert numbers_match(predicted, gold) is expected


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [("25", "025", True), ("25.0", 25, True), ("25.5", 25, False), ("336", "336", True), (None, 1, False)],
)
def test_integers_match(predicted, gold, expected):
    assert integers_match(predicted, gold) is expected


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [
        ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        ("0.5", "\\frac{1}{2}", True),
        ("\\dfrac{1}{2}", "\\frac12", True),
        ("\\frac{1}{3}", "\\frac{1}{2}", False),
        ("x^2+2x+1", "(x+1)^2", True),
        ("\\text{Evelyn}", "\\text{Evelyn}", True),
        ("\\text{Bob}", "\\text{Evelyn}", False),
        (None, "1", False),
    ],
)
def test_expressions_match(predicted, gold, expected):
    assert expressions_match(predicted, gold) is expected


def test_letters_match():
    assert letters_match("b", "B")
    assert not letters_match("C", "B")
    assert not letters_match(None, "B")
