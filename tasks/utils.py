"""lm-eval glue for the mas_* tasks: loaders (`custom_dataset`), `process_docs` that declare the answer format, and
`process_results` scorers. All logic lives in `diffmas_eval.benchmarks`; lm-eval loads this file by path
(`!function utils.name`), so it holds no state of its own."""

from __future__ import annotations

from functools import partial
from typing import Any

from diffmas_eval.benchmarks.arithmetic import load_arithmetic  # noqa: F401  (mas_arithmetic's loader)
from diffmas_eval.benchmarks.code_exec import check_solution
from diffmas_eval.benchmarks.extract import (
    extract_boxed_expression,
    extract_boxed_number,
    extract_code,
    extract_letter,
)
from diffmas_eval.benchmarks.scoring import expressions_match, integers_match, letters_match, numbers_match
from diffmas_eval.benchmarks.sources import load_dataset_dict

# custom_dataset loaders: lm-eval calls them as fn(**metadata, **dataset_kwargs); `data_dir` in --metadata wins over
# $DIFFMAS_DATA_DIR, the rest of the metadata is ignored.
load_gsm8k = partial(load_dataset_dict, "gsm8k")
load_math500 = partial(load_dataset_dict, "math500")
load_aime24 = partial(load_dataset_dict, "aime24")
load_aime25 = partial(load_dataset_dict, "aime25")
load_gpqa_diamond = partial(load_dataset_dict, "gpqa_diamond")
load_arc_easy = partial(load_dataset_dict, "arc_easy")
load_arc_challenge = partial(load_dataset_dict, "arc_challenge")
load_medqa = partial(load_dataset_dict, "medqa")
load_commonsenseqa = partial(load_dataset_dict, "commonsenseqa")
load_openbookqa = partial(load_dataset_dict, "openbookqa")
load_humaneval_plus = partial(load_dataset_dict, "humaneval_plus")
load_mbpp_plus = partial(load_dataset_dict, "mbpp_plus")


def _with_format(answer_format: str, dataset):
    """Every doc gets `answer_format`: our backends read it from `instance.doc` to append the format instruction."""
    return dataset.map(lambda _: {"answer_format": answer_format})


boxed_number_docs = partial(_with_format, "boxed_number")
boxed_expression_docs = partial(_with_format, "boxed_expression")
boxed_letter_docs = partial(_with_format, "boxed_letter")
python_function_docs = partial(_with_format, "python_function")
letter_docs = partial(_with_format, "letter")


def letter_choices(doc: dict[str, Any]) -> list[str]:
    """Multiple-choice (loglikelihood) variants: the choices are the option letters themselves."""
    return list(doc["letters"])


def gold_index(doc: dict[str, Any]) -> int:
    """Position of the correct letter among `letter_choices(doc)`."""
    return doc["letters"].index(doc["gold"])


def score_boxed_number(doc: dict[str, Any], results: list[str]) -> dict[str, int]:
    """GSM8K: first number in the last box (else last number) equals the gold number."""
    predicted = extract_boxed_number(results[0])
    return {"acc": int(numbers_match(predicted, doc["answer"])), "extracted": int(predicted is not None)}


def score_integer(doc: dict[str, Any], results: list[str]) -> dict[str, int]:
    """AIME: the extracted number is an integer equal to the gold integer."""
    predicted = extract_boxed_number(results[0])
    return {"acc": int(integers_match(predicted, doc["answer"])), "extracted": int(predicted is not None)}


def score_boxed_expression(doc: dict[str, Any], results: list[str]) -> dict[str, int]:
    """MATH-500: the last box is mathematically equivalent to the gold answer (math-verify)."""
    predicted = extract_boxed_expression(results[0])
    return {"acc": int(expressions_match(predicted, doc["answer"])), "extracted": int(predicted is not None)}


def score_boxed_letter(doc: dict[str, Any], results: list[str]) -> dict[str, int]:
    """Generative multiple choice: the extracted option letter is the gold letter."""
    predicted = extract_letter(results[0], doc["letters"])
    return {"acc": int(letters_match(predicted, doc["gold"])), "extracted": int(predicted is not None)}


def score_code(doc: dict[str, Any], results: list[str]) -> dict[str, int]:
    """HumanEval+ / MBPP+: evalplus base tests (`pass_base`) and base + extra tests (`pass_plus`), run sandboxed."""
    code = extract_code(results[0], doc["entry_point"])
    if code is None:
        return {"pass_base": 0, "pass_plus": 0, "extracted": 0}
    benchmark = {"humaneval": "humaneval_plus", "mbpp": "mbpp_plus"}[doc["dataset"]]
    verdict = check_solution(benchmark, doc["task_id"], code)
    return {"pass_base": int(verdict.pass_base), "pass_plus": int(verdict.pass_plus), "extracted": 1}
