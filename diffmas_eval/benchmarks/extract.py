"""Pull the final answer out of what a model wrote: boxed numbers and expressions, option letters, Python code.

The semantics follow the reference evaluations (methods.md §9), hardened against what real models write:
thinking blocks are dropped first; `\\boxed{}` and `\\fbox{}` are parsed with brace matching (nested braces work);
when several boxes appear the last one wins; numbers may carry thousands separators, currency signs and units.
Every extractor returns None when nothing usable is found, so callers can record an `extracted` flag.
"""

from __future__ import annotations

import re

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_BOX_COMMANDS = ("\\boxed", "\\fbox")
# Thousands groups first so "1,234" is one number, then plain digits; decimals optional; leading sign optional.
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])[-+]?\.\d+")
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-"})
# LaTeX wrappers models put around a letter or a number inside a box.
_LATEX_WRAPPER = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}")
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def strip_thinking(text: str) -> str:
    """The reply without its reasoning: closed `<think>...</think>` blocks are removed, a reply that starts inside a
    thinking block (the template opened it) keeps only what follows the last `</think>`, and an unclosed `<think>`
    (budget ran out while thinking) drops everything from it on."""
    text = _THINK_BLOCK.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        text = text.split("<think>", 1)[0]
    return text


def find_boxed(text: str) -> list[str]:
    """Contents of every `\\boxed{...}` / `\\fbox{...}` in order, braces matched (so `\\boxed{\\frac{1}{2}}` gives
    `\\frac{1}{2}`). The brace-less form `\\boxed 5` gives its first token. An unclosed box is ignored."""
    found: list[tuple[int, str]] = []
    for command in _BOX_COMMANDS:
        start = 0
        while (pos := text.find(command, start)) != -1:
            start = pos + len(command)
            rest = text[start:]
            if rest[:1] == "{":
                depth = 0
                for offset, char in enumerate(rest):
                    if char == "{":
                        depth += 1
                    elif char == "}":
                        depth -= 1
                        if depth == 0:
                            found.append((pos, rest[1:offset]))
                            break
            elif rest[:1] in (" ", "\t"):
                token = re.match(r"[ \t]+([^\s$]+)", rest)
                if token:
                    found.append((pos, token.group(1)))
    return [content for _, content in sorted(found)]


def last_boxed(text: str) -> str | None:
    """The content of the last box in `text`, or None."""
    boxes = find_boxed(text)
    return boxes[-1] if boxes else None


def _unwrap_latex(content: str) -> str:
    """`\\text{C}` -> `C`, repeatedly, so nested wrappers unwrap too."""
    previous = None
    while previous != content:
        previous, content = content, _LATEX_WRAPPER.sub(r"\1", content)
    return content


def _numbers(text: str) -> list[str]:
    """Every number in `text` as a plain decimal string (commas removed, unicode minus normalised)."""
    text = text.translate(_MINUS_SIGNS)
    return [match.replace(",", "").lstrip("+") for match in _NUMBER.findall(text)]


def extract_boxed_number(reply: str) -> str | None:
    """The final numeric answer (GSM8K, AIME): the first number inside the last box; the box's content when it holds
    no number; the last number in the text when there is no box; None when there is neither."""
    text = strip_thinking(reply)
    box = last_boxed(text)
    if box is not None:
        numbers = _numbers(_unwrap_latex(box))
        return numbers[0] if numbers else (box.strip() or None)
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def extract_boxed_expression(reply: str) -> str | None:
    """The final MATH-style answer: the whole content of the last box (LaTeX kept for the equivalence check); the
    last number in the text when there is no box; None when there is neither."""
    text = strip_thinking(reply)
    box = last_boxed(text)
    if box is not None:
        return box.strip() or None
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def _letter_from_fragment(fragment: str, letters: str) -> str | None:
    """A letter when `fragment` (box content or the words after "answer") is essentially one option letter:
    `C`, `(c)`, `C.`, `**C**`, `C) foo`, `Option C`, `\\text{C}`. Lowercase is accepted only when nothing
    word-like follows it, so "a good answer" is not read as option A."""
    fragment = _unwrap_latex(fragment).strip()
    match = re.match(
        r"^(?:option|choice)?\s*[\s*_(\[{]*([A-Za-z])(?![A-Za-z])(.*)$", fragment, re.IGNORECASE | re.DOTALL
    )
    if not match:
        return None
    letter, rest = match.group(1), match.group(2)
    if letter.upper() not in letters:
        return None
    closed = re.match(r"^\s*[)\]}.:*_]", rest) is not None
    if letter.islower() and not (closed or not rest.strip() or re.match(r"^[\s,;!]*$", rest)):
        return None
    if letter.isupper() or closed or not rest.strip():
        return letter.upper()
    return None


_LETTER_FRAGMENT = re.compile(
    r"^(?:option|choice)?\s*[\s*_(\[{]*([A-Za-z])(?![A-Za-z])(.*)$", re.IGNORECASE | re.DOTALL
)
_ANSWER_PHRASE = re.compile(
    r"(?:final\s+answer|correct\s+(?:answer|option|choice)|answer)\s*(?:is|:|=|would\s+be|should\s+be)?\s*:?\s*",
    re.IGNORECASE,
)


def extract_letter(reply: str, letters: str = "ABCDE") -> str | None:
    """The chosen option letter (upper case) from a free-form reply, or None. Precedence: the last box
    (`\\boxed{B}`, `\\boxed{\\text{(b)}}`), then the last "answer is X" / "answer: x" phrase, then a reply that
    starts with the letter ("B. Oral ulcers", "(B)"), then the last parenthesised capital "(B)" in the text."""
    text = strip_thinking(reply)
    box = last_boxed(text)
    if box is not None:
        letter = _letter_from_fragment(box, letters)
        if letter:
            return letter
    for match in reversed(list(_ANSWER_PHRASE.finditer(text))):
        letter = _letter_from_fragment(text[match.end() : match.end() + 40], letters)
        if letter:
            return letter
    letter = _letter_from_fragment(text.lstrip()[:40], letters) if text.strip() else None
    if letter and (re.match(r"^\s*[*(\[]*[A-Z]\s*[).:\]*]", text) or len(text.strip()) <= 3):
        return letter
    parenthesised = [m for m in re.findall(r"\(([A-Z])\)", text) if m in letters]
    return parenthesised[-1] if parenthesised else None


def extract_code(reply: str, entry_point: str | None = None) -> str | None:
    """The Python code in a reply: among fenced blocks, the last one defining `entry_point` (if given), else the last
    python-tagged or untagged block; an unclosed fence (budget hit) counts up to the end. With no fence the whole
    reply is taken as code. None for an empty reply."""
    text = strip_thinking(reply)
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    if blocks:
        python_blocks = [body for lang, body in blocks if lang in ("", "python", "py", "python3")] or [
            body for _, body in blocks
        ]
        if entry_point:
            defining = [body for body in python_blocks if re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", body)]
            if defining:
                return defining[-1].strip("\n") or None
        return python_blocks[-1].strip("\n") or None
    return text.strip("\n") if text.strip() else None
