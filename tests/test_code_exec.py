"""EvalPlus scoring behind the guards: correct code passes, wrong code fails, and hostile code (endless loops,
forks, unbounded allocation, file deletion, sockets) is scored as failed without escaping or stopping the run."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest

from diffmas_eval.benchmarks import code_exec
from diffmas_eval.benchmarks.code_exec import build_solution, check_solution, expected_output, run_guarded_check

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"


@pytest.fixture(autouse=True)
def _fixture_data(monkeypatch, tmp_path):
    """Fixture evalplus files, a private cache, a 1 GiB memory cap, and a scratch working directory."""
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(FIXTURES))
    monkeypatch.setenv("DIFFMAS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EVALPLUS_MAX_MEMORY_BYTES", str(1 << 30))
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
    # Completion style (a base model continues the prompt with the body) works too.
    verdict = check_solution("mbpp_plus", "Mbpp/9002", "def reverse_list(items):\n    return list(reversed(items))")
    assert (verdict.pass_base, verdict.pass_plus) == (True, True)
    completion = check_solution("humaneval_plus", "HumanEval/1", "    return text.upper() + '!'")
    assert completion.pass_plus


def test_base_only_solution_fails_plus_and_wrong_solution_fails_both():
    base_only = check_solution(
        "humaneval_plus", "HumanEval/0", "def add_all(numbers):\n    return sum(abs(x) for x in numbers)"
    )
    assert (base_only.pass_base, base_only.pass_plus) == (True, False)
    wrong = check_solution("humaneval_plus", "HumanEval/0", "def add_all(numbers):\n    return 0")
    assert (wrong.pass_base, wrong.pass_plus) == (False, False)
    broken = check_solution("humaneval_plus", "HumanEval/0", "def add_all(numbers) return")
    assert not broken.pass_base


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
    start = time.monotonic()
    verdict = check_solution("humaneval_plus", "HumanEval/0", _add_all("while True:\n    pass"))
    assert not verdict.pass_base and not verdict.pass_plus
    assert time.monotonic() - start < 30


def test_outer_wall_clock_guard_kills_a_check_that_outlives_evalplus_limits():
    """Reference times of 100 s make evalplus allow minutes; the outer guard stops it after 4 s."""
    problem = code_exec.load_problems("humaneval_plus")[0]["HumanEval/0"]
    expected = dict(expected_output("humaneval_plus", "HumanEval/0"))
    expected["base_time"] = [100.0] * len(expected["base_time"])
    start = time.monotonic()
    solution = build_solution(_add_all("while True:\n    pass"), problem["prompt"], "add_all")
    verdict = run_guarded_check("humaneval", problem, solution, expected, wall_seconds=4)
    assert verdict.base_status == "timeout" and not verdict.pass_plus
    assert time.monotonic() - start < 15


MARKER = "4242.123"  # a sleep length no other process on the machine uses


@pytest.mark.parametrize(
    "body",
    [
        "import os\nos.fork()",
        "import multiprocessing, time\nmultiprocessing.Process(target=time.sleep, args=(1,)).start()",
        f"import subprocess\nsubprocess.Popen(['sleep', '{MARKER}'])",
        f"import os\nos.posix_spawn('/bin/sleep', ['sleep', '{MARKER}'], dict(os.environ))",
        f"import os\nos.execv('/bin/sleep', ['sleep', '{MARKER}'])",
        f"import os\nos.system('sleep {MARKER} &')",
        "import os\nos.setsid()",
        "import ctypes\nctypes.CDLL(None).fork()",
    ],
    ids=["os.fork", "multiprocessing", "subprocess", "posix_spawn", "execv", "os.system", "setsid", "ctypes"],
)
def test_process_creation_fails_and_leaves_nothing_behind(body):
    verdict = check_solution("humaneval_plus", "HumanEval/0", _add_all(body))
    assert not verdict.pass_base
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if MARKER in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []


def test_unbounded_allocation_fails_under_the_memory_cap():
    verdict = check_solution(
        "humaneval_plus", "HumanEval/0", _add_all("chunks = []\nwhile True:\n    chunks.append(bytearray(10**8))")
    )
    assert not verdict.pass_base


@pytest.mark.parametrize(
    "template",
    [
        "import os\nos.remove({path!r})",
        "import shutil\nshutil.rmtree({folder!r})",
        "import pathlib\npathlib.Path({path!r}).unlink()",
        "import os\nos.rename({path!r}, {path!r} + '.moved')",
        "open({path!r}, 'w').write('gone')",
        "import io\nio.open({path!r}, 'w').write('gone')",
        "import os\nfd = os.open({path!r}, os.O_WRONLY | os.O_TRUNC)",
        "import os\nos.truncate({path!r}, 0)",
        "import os\nos.execv('/bin/rm', ['rm', '-rf', {folder!r}])",
    ],
    ids=["remove", "rmtree", "unlink", "rename", "open", "io.open", "os.open", "truncate", "exec-rm"],
)
def test_file_destruction_fails_and_the_sentinel_survives(tmp_path, template):
    folder = tmp_path / "outside"
    folder.mkdir()
    sentinel = folder / "sentinel.txt"
    sentinel.write_text("keep me")
    body = template.format(path=str(sentinel), folder=str(folder))
    verdict = check_solution("humaneval_plus", "HumanEval/0", _add_all(body))
    assert not verdict.pass_base
    assert sentinel.read_text() == "keep me"
    assert os.listdir(folder) == ["sentinel.txt"]


@pytest.mark.parametrize(
    "body",
    [
        "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(('127.0.0.1', 9))",
        "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)",
        "import _socket\n_socket.socket()",
    ],
    ids=["socket", "create_connection", "_socket"],
)
def test_sockets_fail(body):
    assert not check_solution("humaneval_plus", "HumanEval/0", _add_all(body)).pass_base


def test_evaluation_goes_on_after_hostile_samples():
    """A run of hostile and normal samples in sequence: the normal ones after the hostile ones still pass."""
    hostile = [_add_all("while True:\n    pass"), _add_all("import os\nos.fork()")]
    for code in hostile:
        assert not check_solution("humaneval_plus", "HumanEval/0", code).pass_base
    assert check_solution("humaneval_plus", "HumanEval/0", "def add_all(numbers):\n    return sum(numbers)").pass_plus
