"""EvalPlus scoring: correct code passes, wrong code fails, limits hold, batches equal single checks, and the
HumanEval/32 oracle is scored correctly. Hostile code and the sandbox itself: tests/test_code_sandbox.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from diffmas_eval.benchmarks import code_exec
from diffmas_eval.benchmarks.code_exec import (
    CodeCheck,
    CodeSandboxError,
    build_solution,
    check_solution,
    expected_output,
    load_problems,
    run_checks,
    score_programs,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"

# Our own find_zero problem in HumanEval/32's shape (evalplus's oracle for it is chosen by the entry point).
FIND_ZERO_PROMPT = '''import math


def poly(xs: list, x: float):
    """Evaluates the polynomial with coefficients xs at x."""
    return sum([coeff * math.pow(x, i) for i, coeff in enumerate(xs)])


def find_zero(xs: list):
    """A zero of the polynomial with coefficients xs (odd degree)."""
'''
FIND_ZERO_BISECTION = """    low, high = -100.0, 100.0
    for _ in range(200):
        middle = (low + high) / 2
        if (poly(xs, low) > 0) == (poly(xs, middle) > 0):
            low = middle
        else:
            high = middle
    return low
"""
FIND_ZERO_PROBLEM = {
    "task_id": "HumanEval/32",
    "prompt": FIND_ZERO_PROMPT,
    "entry_point": "find_zero",
    "canonical_solution": FIND_ZERO_BISECTION,
    "contract": "",
    "test": "",
    "base_input": [[[1, 2]], [[-6, 11, -6, 1]]],
    "plus_input": [[[2, -3, 0, 1]], [[5, 0, 0, 0, 0, 1]]],
    "atol": 0.0001,
}


@pytest.fixture(autouse=True)
def _fixture_data(monkeypatch, tmp_path):
    """Fixture evalplus files, a private cache, a 1 GiB memory cap, a scratch working directory, the full sandbox."""
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(FIXTURES))
    monkeypatch.setenv("DIFFMAS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EVALPLUS_MAX_MEMORY_BYTES", str(1 << 30))
    monkeypatch.setenv("DIFFMAS_CODE_SANDBOX", "full")
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)


def _add_all(body: str) -> str:
    """A definition of the fixture's `add_all` that runs `body` first and then returns the right answer."""
    indented = "\n".join("    " + line for line in body.splitlines())
    return f"def add_all(numbers):\n{indented}\n    return sum(numbers)\n"


def test_correct_solutions_pass_base_and_plus():
    verdict = check_solution("humaneval_plus", "HumanEval/0", "def add_all(numbers):\n    return sum(numbers)")
    assert (verdict.pass_base, verdict.pass_plus) == (True, True)
    verdict = check_solution("mbpp_plus", "Mbpp/9002", "def reverse_list(items):\n    return list(reversed(items))")
    assert (verdict.pass_base, verdict.pass_plus) == (True, True)
    # Completion style (a base model continues the prompt with the body) works too.
    completion = check_solution("humaneval_plus", "HumanEval/1", "    return text.upper() + '!'")
    assert completion.pass_plus


def test_canonical_solutions_of_the_fixture_problems_pass():
    for benchmark in ("humaneval_plus", "mbpp_plus"):
        problems, _ = load_problems(benchmark)
        programs = [(task_id, p["prompt"] + p["canonical_solution"]) for task_id, p in problems.items()]
        verdicts = score_programs(benchmark, programs)
        assert [(v.base_status, v.plus_status) for v in verdicts] == [("pass", "pass")] * len(programs)


def test_base_only_solution_fails_plus_and_wrong_solution_fails_both():
    base_only = check_solution(
        "humaneval_plus", "HumanEval/0", "def add_all(numbers):\n    return sum(abs(x) for x in numbers)"
    )
    assert (base_only.pass_base, base_only.pass_plus) == (True, False)
    wrong = check_solution("humaneval_plus", "HumanEval/0", "def add_all(numbers):\n    return 0")
    assert (wrong.pass_base, wrong.pass_plus) == (False, False)
    broken = check_solution("humaneval_plus", "HumanEval/0", "def add_all(numbers) return")
    assert not broken.pass_base


def test_a_batch_scored_several_at_once_equals_one_at_a_time():
    codes = ["return sum(numbers)", "return 0", "return sum(abs(x) for x in numbers)", "while True: pass"]
    programs = [("HumanEval/0", f"def add_all(numbers):\n    {code}\n") for code in codes] * 2
    together = score_programs("humaneval_plus", programs, parallel=3)
    alone = [score_programs("humaneval_plus", [program], parallel=1)[0] for program in programs[:4]]
    assert together == alone * 2
    assert [v.pass_plus for v in alone] == [True, False, False, False]


def test_the_workers_check_gives_evalplus_check_correctness_statuses():
    """The worker runs evalplus's two `untrusted_check` calls itself (so it need not import `evalplus.evaluate`);
    the statuses equal `evalplus.evaluate.check_correctness` as evalplus's evaluator calls it. Fixture programs
    only: both run unsandboxed here."""
    from evalplus.evaluate import check_correctness as evalplus_check_correctness

    from diffmas_eval.benchmarks._code_worker import check_correctness

    problem = load_problems("humaneval_plus")[0]["HumanEval/0"]
    expected = expected_output("humaneval_plus", "HumanEval/0")
    codes = ["return sum(numbers)", "return 0", "return sum(abs(x) for x in numbers)", "while True: pass"]
    seen = set()
    for code in codes:
        solution = f"def add_all(numbers):\n    {code}\n"
        theirs = evalplus_check_correctness("humaneval", 0, problem, solution, expected, fast_check=True)
        ours = check_correctness("humaneval", problem, solution, expected)
        assert ours == (theirs["base"][0], theirs["plus"][0])
        seen.add(ours)
    assert seen == {("pass", "pass"), ("fail", "fail"), ("pass", "fail")}


def test_ground_truth_is_cached_per_dataset_hash(tmp_path):
    expected_output("mbpp_plus", "Mbpp/9001")
    cached = list((tmp_path / "cache" / "evalplus_groundtruth").glob("*.pkl"))
    assert len(cached) == 1 and cached[0].name.endswith("-Mbpp_9001.pkl")
    assert expected_output("mbpp_plus", "Mbpp/9001")["plus"] == [16, 0]


def test_build_solution_keeps_prompt_imports_for_full_definitions():
    prompt = "from typing import List\n\n\ndef f(xs: List[int]) -> int:\n    '''doc'''\n"
    assert build_solution("def f(xs: List[int]) -> int:\n    return 1", prompt, "f").startswith(
        "from typing import List\n"
    )
    assert build_solution("    return 1", prompt, "f") == prompt + "    return 1\n"


def test_endless_loop_is_a_failure_within_the_time_limit():
    limit = code_exec._wall_clock_limit(expected_output("humaneval_plus", "HumanEval/0"))
    start = time.monotonic()
    verdict = check_solution("humaneval_plus", "HumanEval/0", _add_all("while True:\n    pass"))
    assert not verdict.pass_base and not verdict.pass_plus
    assert time.monotonic() - start < limit


def test_hard_wall_clock_limit_stops_a_check_that_outlives_evalplus_limits():
    """Reference times of 100 s make evalplus allow minutes; the sandbox's deadline stops the check after 4 s."""
    problem = load_problems("humaneval_plus")[0]["HumanEval/0"]
    expected = dict(expected_output("humaneval_plus", "HumanEval/0"))
    expected["base_time"] = [100.0] * len(expected["base_time"])
    solution = build_solution(_add_all("while True:\n    pass"), problem["prompt"], "add_all")
    start = time.monotonic()
    [verdict] = run_checks([CodeCheck("humaneval", problem, solution, expected, wall_seconds=4)])
    assert verdict.base_status == "timeout" and not verdict.pass_plus
    assert time.monotonic() - start < 4 + 3


def test_unbounded_allocation_fails_under_the_memory_cap():
    verdict = check_solution(
        "humaneval_plus", "HumanEval/0", _add_all("chunks = []\nwhile True:\n    chunks.append(bytearray(10**8))")
    )
    assert not verdict.pass_base


@pytest.mark.parametrize(
    "body",
    [
        "def deeper(n):\n    return deeper(n + 1)\nreturn deeper(0)",  # RecursionError
        # the interpreter's own stack: a limit far above the C stack crashes the process that runs the candidate
        "import sys\nsys.setrecursionlimit(10**8)\ndef deeper(n):\n    return deeper(n + 1)\nreturn deeper(0)",
    ],
    ids=["recursion-error", "c-stack-overflow"],
)
def test_deep_recursion_fails_within_the_time_limit_and_the_next_check_passes(body):
    limit = code_exec._wall_clock_limit(expected_output("humaneval_plus", "HumanEval/0"))
    start = time.monotonic()
    verdict = check_solution("humaneval_plus", "HumanEval/0", _add_all(body))
    assert not verdict.pass_base and not verdict.pass_plus
    assert time.monotonic() - start < limit
    assert check_solution("humaneval_plus", "HumanEval/0", "def add_all(numbers):\n    return sum(numbers)").pass_plus


def test_evaluation_goes_on_after_hostile_samples():
    """A run of hostile and normal samples in sequence: the normal ones after the hostile ones still pass."""
    hostile = [_add_all("while True:\n    pass"), _add_all("import posix\nposix.fork()")]
    for code in hostile:
        assert not check_solution("humaneval_plus", "HumanEval/0", code).pass_base
    assert check_solution("humaneval_plus", "HumanEval/0", "def add_all(numbers):\n    return sum(numbers)").pass_plus


def test_unknown_sandbox_policy_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("DIFFMAS_CODE_SANDBOX", "strict")
    with pytest.raises(CodeSandboxError, match="DIFFMAS_CODE_SANDBOX='strict' is not one of auto, full, guard-only"):
        check_solution("humaneval_plus", "HumanEval/0", "def add_all(numbers):\n    return 0")


def test_the_full_sandbox_is_recorded_for_the_results_config():
    check_solution("humaneval_plus", "HumanEval/0", "def add_all(numbers):\n    return 0")
    status = code_exec.sandbox_status()
    assert status["sandbox"] == "full" and status["policy"] == "full" and "warning" not in status
    assert any("namespaces" in layer for layer in status["layers"])


@pytest.fixture
def find_zero_data(tmp_path, monkeypatch) -> Path:
    """A data directory whose HumanEval+ file holds one find_zero problem (HumanEval/32's oracle)."""
    root = tmp_path / "data"
    (root / "humanevalplus").mkdir(parents=True)
    (root / "humanevalplus" / "HumanEvalPlus-v0.1.10.jsonl").write_text(json.dumps(FIND_ZERO_PROBLEM) + "\n")
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(root))
    return root


def test_find_zero_oracle_scores_a_correct_root_as_a_pass(find_zero_data):
    """evalplus 0.3.1 fails every find_zero solution (its oracle `continue`s past the bookkeeping); we record the
    pass its assertion established, and a wrong root still fails."""
    canonical = FIND_ZERO_PROMPT + FIND_ZERO_BISECTION
    wrong = FIND_ZERO_PROMPT + "    return 0.5\n"
    not_a_number = FIND_ZERO_PROMPT + "    return None\n"
    verdicts = score_programs("humaneval_plus", [("HumanEval/32", p) for p in (canonical, wrong, not_a_number)])
    assert [(v.base_status, v.plus_status) for v in verdicts] == [("pass", "pass"), ("fail", "fail"), ("fail", "fail")]


def test_evalplus_itself_still_fails_a_correct_find_zero(find_zero_data):
    """The defect our worker corrects, shown with evalplus's own `check_correctness` (trusted code, run as evalplus
    runs it). When this fails, evalplus has fixed its oracle and `unsafe_execute_with_find_zero_fix` can go."""
    from evalplus.evaluate import check_correctness

    problem = load_problems("humaneval_plus")[0]["HumanEval/32"]
    expected = expected_output("humaneval_plus", "HumanEval/32")
    result = check_correctness("humaneval", 0, problem, FIND_ZERO_PROMPT + FIND_ZERO_BISECTION, expected)
    assert result["base"][0] == "fail" and result["base"][1] == []


def test_canonical_solutions_of_real_problems_pass_including_humaneval_32(shared_data_dir, monkeypatch):
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(shared_data_dir))
    for benchmark, chosen in (("humaneval_plus", [0, 1, 2, 31, 32, 33]), ("mbpp_plus", [0, 1, 2, 3, 4, 5])):
        problems, _ = load_problems(benchmark)
        task_ids = [list(problems)[i] for i in chosen]
        programs = [(t, problems[t]["prompt"] + problems[t]["canonical_solution"]) for t in task_ids]
        verdicts = score_programs(benchmark, programs)
        assert {t: v.pass_plus for t, v in zip(task_ids, verdicts, strict=True)} == dict.fromkeys(task_ids, True)


def test_missing_problem_is_one_clear_error():
    from diffmas_eval.benchmarks.sources import BenchmarkDataError

    with pytest.raises(BenchmarkDataError, match="has no problem 'HumanEval/999'"):
        check_solution("humaneval_plus", "HumanEval/999", "def f(): pass")


def teardown_module() -> None:
    code_exec.close_worker()
