"""Compare an extracted answer with the gold one: numbers, integers, LaTeX expressions (math-verify), letters."""

from __future__ import annotations

import threading
from decimal import Decimal, InvalidOperation


def _decimal(value: str | int | float | None) -> Decimal | None:
    if value is None:
        return None
    text = str(value).strip().replace(",", "").replace("$", "").translate({0x2212: "-"})
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


def numbers_match(predicted: str | None, gold: str | int | float) -> bool:
    """True when `predicted` parses as a number equal to `gold` (`18.00` equals `18`, `1,000` equals `1000`)."""
    left, right = _decimal(predicted), _decimal(gold)
    return left is not None and right is not None and left == right


def integers_match(predicted: str | None, gold: str | int) -> bool:
    """AIME scoring: both sides are integers and equal (`"025"` equals `25`; `25.5` never matches)."""
    left, right = _decimal(predicted), _decimal(gold)
    if left is None or right is None or left != left.to_integral_value() or right != right.to_integral_value():
        return False
    return int(left) == int(right)


def expressions_match(predicted: str | None, gold: str) -> bool:
    """MATH-500 scoring: mathematical equivalence of two boxed LaTeX answers by math-verify
    (`\\frac{1}{2}` equals `0.5`, `(3,\\frac{\\pi}{2})` equals `\\left( 3, \\frac{\\pi}{2} \\right)`),
    falling back to whitespace-insensitive string equality when math-verify cannot parse either side."""
    if predicted is None:
        return False
    from math_verify import parse, verify

    # math-verify's timeouts use SIGALRM, which only works on the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
    predicted_parsed = parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout)
    if gold_parsed and predicted_parsed and verify(gold_parsed, predicted_parsed, timeout_seconds=timeout):
        return True
    return "".join(predicted.split()) == "".join(gold.split())


def letters_match(predicted: str | None, gold: str) -> bool:
    """Multiple choice: the same option letter, case-insensitive."""
    return predicted is not None and predicted.strip().upper() == gold.strip().upper()
