"""Training data: train splits of the project's benchmarks (or a `{question, target}` JSONL) as question/target pairs.

The question is exactly the evaluation task's context (the bare problem; options as `A. ...` lines for choice tasks,
built by `diffmas_eval.benchmarks.sources`), and the target is the gold answer written in the evaluation task's
answer format, so the final agent is trained on the very prompt it is evaluated with.

Decontamination drops every training item that is also an evaluation item of any benchmark this project evaluates
(same normalised question, and for choice items the same options; MBPP by task id against MBPP+).
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffmas_eval.benchmarks import sources
from diffmas_eval.benchmarks.sources import BenchmarkDataError, resolve_data_dir
from diffmas_eval.prompts import ANSWER_FORMATS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainItem:
    """One training example: the task context the final agent sees, and the reply it is trained to give."""

    id: str
    question: str
    target: str
    answer_format: str | None
    source: str
    choices: tuple[str, tuple[str, ...], int] | None = None  # choice items: (stem, options, gold index)


@dataclass
class DataReport:
    """Counts per source, recorded in the adapter config."""

    loaded: dict[str, int] = field(default_factory=dict)
    decontaminated: dict[str, int] = field(default_factory=dict)
    capped: dict[str, int] = field(default_factory=dict)
    too_long: int = 0
    used: int = 0
    eval_sets_checked: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "loaded": self.loaded,
            "dropped_as_eval_items": self.decontaminated,
            "kept_per_source_after_cap": self.capped,
            "dropped_too_long": self.too_long,
            "used": self.used,
            "eval_sets_checked": self.eval_sets_checked,
        }


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip().lower()


def _choice_key(question: str, options: list[str]) -> str:
    return _normalise(question) + "||" + "|".join(sorted(_normalise(o) for o in options))


def choice_target(gold: str, answer_format: str) -> str:
    """The reply for a multiple-choice item: the letter (`letter`) or the letter in a box (`boxed_letter`)."""
    if answer_format == "letter":
        return gold
    if answer_format == "boxed_letter":
        return f"The answer is \\boxed{{{gold}}}."
    raise ValueError(
        f"answer_format {answer_format!r} does not fit a multiple-choice source; use letter or boxed_letter"
    )


def gsm8k_target(solution: str, answer_format: str) -> str:
    """GSM8K's gold solution with calculator annotations removed and `#### X` turned into `\\boxed{X}`."""
    if answer_format != "boxed_number":
        raise ValueError(f"answer_format {answer_format!r} does not fit gsm8k; use boxed_number")
    reasoning, _, answer = solution.rpartition("####")
    reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()
    answer = answer.strip().replace(",", "")
    return f"{reasoning}\nThe final answer is \\boxed{{{answer}}}."


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not valid JSON ({error}); fix or remove that line") from None
    return rows


def _split_file(root: Path, relative: str) -> Path:
    path = root / relative
    if not path.is_file():
        raise FileNotFoundError(f"training data file {path} is missing; point data_dir at a copy of shared/data")
    return path


def _choice_source(name: str) -> Callable[[Path, str], list[TrainItem]]:
    def load(root: Path, answer_format: str) -> list[TrainItem]:
        rows = sources.NORMALISERS[name](_read_jsonl(_split_file(root, f"{name}/train.jsonl")), "local")
        return [
            TrainItem(
                r["id"],
                r["query"],
                choice_target(r["gold"], answer_format),
                answer_format,
                name,
                (r["question"], tuple(r["options"]), r["letters"].index(r["gold"])),
            )
            for r in rows
        ]

    return load


def _gsm8k(root: Path, answer_format: str) -> list[TrainItem]:
    rows = _read_jsonl(_split_file(root, "gsm8k/train.jsonl"))
    return [
        TrainItem(f"train-{i}", r["question"], gsm8k_target(r["answer"], answer_format), answer_format, "gsm8k")
        for i, r in enumerate(rows)
    ]


def mbpp_question(prompt: str, first_test: str) -> str:
    """An MBPP task phrased as MBPP+ phrases its prompts: a docstring holding the task and one example assert."""
    return f'"""\n{prompt.strip()}\n{first_test.strip()}\n"""\n'


def _mbpp(root: Path, answer_format: str) -> list[TrainItem]:
    if answer_format != "python_function":
        raise ValueError(f"answer_format {answer_format!r} does not fit mbpp; use python_function")
    items = []
    for split in ("train", "prompt"):
        for r in _read_jsonl(_split_file(root, f"mbpp/sanitized_{split}.jsonl")):
            question = mbpp_question(r["prompt"], r["test_list"][0])
            target = f"```python\n{r['code'].strip()}\n```"
            items.append(TrainItem(f"Mbpp/{r['task_id']}", question, target, answer_format, "mbpp"))
    return items


def _arithmetic(root: Path | None, answer_format: str) -> list[TrainItem]:
    """The train split of the generated `mas_arithmetic` task (disjoint from its test split by construction)."""
    from diffmas_eval.benchmarks.arithmetic import arithmetic_rows

    if answer_format != "boxed_number":
        raise ValueError(f"answer_format {answer_format!r} does not fit arithmetic; use boxed_number")
    target = "The answer is \\boxed{{{}}}."
    return [
        TrainItem(r["id"], r["problem"], target.format(r["answer"]), answer_format, "arithmetic")
        for r in arithmetic_rows("train")
    ]


# Sources generated in code: no data directory needed.
GENERATED_SOURCES = ("arithmetic",)
# Source name -> (loader, the evaluation task's answer format).
TRAIN_SOURCES: dict[str, tuple[Callable[[Path, str], list[TrainItem]], str]] = {
    "gsm8k": (_gsm8k, "boxed_number"),
    "arc_easy": (_choice_source("arc_easy"), "boxed_letter"),
    "arc_challenge": (_choice_source("arc_challenge"), "boxed_letter"),
    "openbookqa": (_choice_source("openbookqa"), "boxed_letter"),
    "commonsenseqa": (_choice_source("commonsenseqa"), "boxed_letter"),
    "mbpp": (_mbpp, "python_function"),
    "arithmetic": (_arithmetic, "boxed_number"),
}


def _jsonl_source(path: Path, answer_format: str | None) -> list[TrainItem]:
    if not path.is_file():
        raise FileNotFoundError(f"training data file {path} does not exist; check the path in `data`")
    items = []
    for i, row in enumerate(_read_jsonl(path)):
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("question"), str)
            or not isinstance(row.get("target"), str)
        ):
            raise ValueError(f"{path} row {i + 1} needs string fields `question` and `target`")
        fmt = answer_format or row.get("answer_format")
        items.append(TrainItem(str(row.get("id", i)), row["question"], row["target"], fmt, str(path)))
    return items


def check_source_names(names: list[str]) -> None:
    """Raise before any work if a source is neither a known train split nor a JSONL path."""
    for name in names:
        if name not in TRAIN_SOURCES and not name.endswith((".jsonl", ".json")):
            known = ", ".join(TRAIN_SOURCES)
            raise ValueError(f"unknown training source {name!r}; use one of {known} or a path to a .jsonl file")


def load_train_items(
    names: list[str], answer_format: str | None, data_dir: str | None
) -> tuple[list[TrainItem], dict[str, int]]:
    """All items of the named sources, and how many each gave."""
    check_source_names(names)
    if answer_format is not None and answer_format not in ANSWER_FORMATS:
        raise ValueError(f"unknown answer_format {answer_format!r}; use one of {', '.join(ANSWER_FORMATS)}")
    items: list[TrainItem] = []
    counts: dict[str, int] = {}
    root = None
    for name in names:
        if name in TRAIN_SOURCES:
            if root is None and name not in GENERATED_SOURCES:
                root = resolve_data_dir(data_dir)
                if root is None:
                    raise FileNotFoundError(
                        "no benchmark data directory: set DIFFMAS_DATA_DIR or data_dir to a copy of shared/data"
                    )
            loader, default_format = TRAIN_SOURCES[name]
            loaded = loader(root, answer_format or default_format)
        else:
            loaded = _jsonl_source(Path(name).expanduser(), answer_format)
        counts[name] = len(loaded)
        items += loaded
    return items, counts


def evaluation_keys(data_dir: str | None) -> tuple[set[str], set[str], list[str]]:
    """Normalised keys of every evaluation item in the data directory: (question keys, MBPP+ task ids, sets checked).

    Only the local data directory is read (never the hub): a benchmark whose file is absent there is not checked,
    and the list of checked sets is recorded with the adapter.
    """
    keys: set[str] = set()
    mbpp_ids: set[str] = set()
    checked = []
    root = resolve_data_dir(data_dir)
    if root is None:
        return keys, mbpp_ids, checked
    for benchmark in sources.LOCAL_FILES:
        try:
            if benchmark in ("mbpp_plus", "humaneval_plus"):
                rows, _ = sources.raw_rows(benchmark, root)
                mbpp_ids.update(str(r["task_id"]) for r in rows if benchmark == "mbpp_plus")
                keys.update(_normalise(r["prompt"]) for r in rows)
            else:
                for row in sources.load_rows(benchmark, root):
                    if "options" in row:
                        keys.add(_choice_key(row["question"], row["options"]))
                    keys.add(_normalise(row.get("problem") or row.get("query") or row.get("question")))
        except BenchmarkDataError:
            continue
        checked.append(benchmark)
    return keys, mbpp_ids, checked


def _item_keys(item: TrainItem) -> list[str]:
    keys = [_normalise(item.question)]
    lines = item.question.split("\n")
    options = [re.sub(r"^[A-J]\. ", "", line) for line in lines if re.match(r"^[A-J]\. ", line)]
    if options:
        stem = "\n".join(line for line in lines if not re.match(r"^[A-J]\. ", line))
        keys.append(_choice_key(stem, options))
    return keys


def decontaminate(items: list[TrainItem], data_dir: str | None, report: DataReport) -> list[TrainItem]:
    """Drop items that are evaluation items; count the drops per source in `report`."""
    keys, mbpp_ids, checked = evaluation_keys(data_dir)
    report.eval_sets_checked = checked
    if not checked:
        logger.warning("decontamination checked no evaluation set: no data directory (set DIFFMAS_DATA_DIR)")
    kept = []
    for item in items:
        if (item.source == "mbpp" and item.id in mbpp_ids) or any(k in keys for k in _item_keys(item)):
            report.decontaminated[item.source] = report.decontaminated.get(item.source, 0) + 1
            continue
        kept.append(item)
    return kept


def balance_letters(items: list[TrainItem], seed: int) -> list[TrainItem]:
    """Move each choice item's gold option so the gold letters are as uniform as possible over `items`.

    In a seeded order, the i-th choice item gets its gold option at position `i mod (number of options)`; the other
    options keep their relative order. Without it a small model's adapter can learn the training set's letter prior
    (answer the most frequent letter) instead of anything about the questions. Other items are unchanged.
    """
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    balanced = list(items)
    for rank, index in enumerate(i for i in order if items[i].choices is not None):
        item = items[index]
        stem, options, gold = item.choices
        others = [option for k, option in enumerate(options) if k != gold]
        position = rank % len(options)
        options = (*others[:position], options[gold], *others[position:])
        target = choice_target(sources.LETTERS[position], item.answer_format)
        query = sources.format_multiple_choice(stem, options)
        balanced[index] = TrainItem(item.id, query, target, item.answer_format, item.source, (stem, options, position))
    return balanced


def cap_per_source(items: list[TrainItem], cap: int, seed: int, report: DataReport) -> list[TrainItem]:
    """At most `cap` items of each source: a seeded random subset of a larger source (seeded by `seed` and the
    source's name, so adding a source does not change another's subset), in the sources' original order."""
    by_source: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        by_source.setdefault(item.source, []).append(index)
    keep: set[int] = set()
    for source, indices in by_source.items():
        chosen = indices if len(indices) <= cap else random.Random(f"{seed}:{source}").sample(indices, cap)
        keep.update(chosen)
        report.capped[source] = len(chosen)
    return [item for index, item in enumerate(items) if index in keep]


def prepare_items(
    names: list[str],
    answer_format: str | None,
    data_dir: str | None,
    *,
    decontaminate_items: bool,
    max_items: int | None,
    seed: int,
    balance: bool = False,
    max_per_source: int | None = None,
) -> tuple[list[TrainItem], DataReport]:
    """Load, decontaminate, cap each source and subsample (seeded), and optionally letter-balance the training items;
    an empty result is an error."""
    items, counts = load_train_items(names, answer_format, data_dir)
    report = DataReport(loaded=counts)
    if decontaminate_items:
        items = decontaminate(items, data_dir, report)
    if not items:
        raise ValueError(f"no training items left from {names} (loaded {counts}, dropped {report.decontaminated})")
    if max_per_source is not None:
        items = cap_per_source(items, max_per_source, seed, report)
    if max_items is not None and max_items < len(items):
        items = random.Random(seed).sample(items, max_items)
    if balance:
        items = balance_letters(items, seed)
    return items, report
