"""A small deterministic arithmetic task generated in code (`mas_arithmetic`): two-operand sums a small model gets
right sometimes, so that a verifiable reward is learnable on a CPU (NeuroMAS's evidence, `results/neuromas/`).

Splits: `test` (held out, 200 problems) and `train` (600 problems, none equal to a test problem), each drawn from
its own seeded generator; rows use the math schema `{id, problem, answer}` of `sources`.
"""

from __future__ import annotations

import random
from typing import Any

SPLIT_SIZES = {"test": 200, "train": 600}  # of the 900 ordered pairs of operands
_SEEDS = {"test": 20260, "train": 20261}
OPERAND_RANGE = (1, 30)


def _problem(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(*OPERAND_RANGE), rng.randint(*OPERAND_RANGE)
    return f"What is {a} + {b}?", str(a + b)


def arithmetic_rows(split: str) -> list[dict[str, Any]]:
    """The rows of a split, the same on every machine (`random.Random` with a fixed seed per split)."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown arithmetic split {split!r}; use one of {', '.join(SPLIT_SIZES)}")
    held_out = set() if split == "test" else {row["problem"] for row in arithmetic_rows("test")}
    rng = random.Random(_SEEDS[split])
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(rows) < SPLIT_SIZES[split]:
        problem, answer = _problem(rng)
        if problem in held_out or problem in seen:
            continue
        seen.add(problem)
        rows.append({"id": f"{split}-{len(rows)}", "problem": problem, "answer": answer})
    return rows


def load_arithmetic(**_ignored: Any):
    """`datasets.DatasetDict` with both splits, for lm-eval's `custom_dataset` (the task metadata is ignored)."""
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(arithmetic_rows(split)) for split in SPLIT_SIZES})
