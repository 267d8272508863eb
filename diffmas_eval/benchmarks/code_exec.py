"""Score generated code with EvalPlus (HumanEval+, MBPP+), one solution at a time, behind two guards.

Inner guard (evalplus): `check_correctness` runs the candidate in a forked child with a per-test time limit, an
address-space cap (`EVALPLUS_MAX_MEMORY_BYTES`, default 4 GiB), a temporary working directory, and destructive
calls disabled (`reliability_guard`). This module tightens that guard in the child (process spawning and `exec*`,
new sessions/process groups, sockets, ctypes and file opening are disabled too) and adds an outer guard:
each check runs in a fresh interpreter (`diffmas_eval.benchmarks._code_worker`: it never inherits the evaluating
process's model memory, whose address space alone would exceed the cap, and it never re-imports the user's main
script as multiprocessing's spawn/forkserver would) in a temporary working directory and its own session; the caller
waits with a hard wall-clock limit and then kills the whole process group, so a hung, forked or runaway candidate is
scored as failed and the run goes on. This is a guard against accidents, not a security sandbox: run untrusted
models in a container.

Data: the evalplus release files are read from the data directory (`humanevalplus/HumanEvalPlus-v0.1.10.jsonl`,
`mbppplus/MbppPlus-v0.2.0.jsonl`) by pointing `HUMANEVAL_OVERRIDE_PATH` / `MBPP_OVERRIDE_PATH` at them; without a
data directory evalplus uses its own cache or download (`~/.cache/evalplus`). Expected outputs are computed once per
problem with evalplus's `get_groundtruth` and cached under `diffmas_eval.paths.cache_dir()/evalplus_groundtruth`.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffmas_eval.benchmarks.sources import LOCAL_FILES, BenchmarkDataError, _offline, local_file, resolve_data_dir
from diffmas_eval.paths import DATA_DIR_ENV, cache_dir

# benchmark -> (evalplus dataset name, override variable, evalplus file name)
CODE_BENCHMARKS: dict[str, tuple[str, str, str]] = {
    "humaneval_plus": ("humaneval", "HUMANEVAL_OVERRIDE_PATH", "HumanEvalPlus-v0.1.10.jsonl"),
    "mbpp_plus": ("mbpp", "MBPP_OVERRIDE_PATH", "MbppPlus-v0.2.0.jsonl"),
}
_STARTUP_SECONDS = 20.0  # interpreter start and evalplus imports on a slow machine, on top of evalplus's own limits
_problem_cache: dict[tuple[str, str], tuple[dict[str, dict[str, Any]], str]] = {}


@dataclass(frozen=True)
class CodeVerdict:
    """EvalPlus verdicts for one solution: status is `pass`, `fail` or `timeout` for the base and plus tests."""

    base_status: str
    plus_status: str

    @property
    def pass_base(self) -> bool:
        return self.base_status == "pass"

    @property
    def pass_plus(self) -> bool:
        """evalplus's "plus" score: the solution passes the base tests and the extra tests."""
        return self.base_status == "pass" and self.plus_status == "pass"


def _evalplus_file(benchmark: str, data_dir: str | os.PathLike | None) -> str | None:
    """Point evalplus at the data directory's copy (before evalplus reads it); None means evalplus's own cache."""
    _, variable, file_name = CODE_BENCHMARKS[benchmark]
    root = resolve_data_dir(data_dir)
    if root is not None:
        path = str(local_file(benchmark, root))
        os.environ[variable] = path
        module = sys.modules.get(f"evalplus.data.{CODE_BENCHMARKS[benchmark][0]}")
        if module is not None:  # evalplus already imported: its module constant was read at import time
            setattr(module, variable, path)
        return path
    if os.environ.get(variable):
        return os.environ[variable]
    from appdirs import user_cache_dir

    cached = Path(user_cache_dir("evalplus")) / file_name
    if not cached.is_file() and _offline():
        raise BenchmarkDataError(
            f"no offline copy of {benchmark} and the network is disabled; set {DATA_DIR_ENV} to a data directory "
            f"holding {' or '.join(LOCAL_FILES[benchmark])}."
        )
    return str(cached) if cached.is_file() else None


def load_problems(benchmark: str, data_dir: str | os.PathLike | None = None) -> tuple[dict[str, dict[str, Any]], str]:
    """evalplus problems `{task_id: problem}` and the dataset hash (md5 of the release file, as evalplus computes)."""
    if benchmark not in CODE_BENCHMARKS:
        raise BenchmarkDataError(f"unknown code benchmark {benchmark!r}; known: {', '.join(CODE_BENCHMARKS)}.")
    path = _evalplus_file(benchmark, data_dir)
    key = (benchmark, path or "")
    if key not in _problem_cache:
        from evalplus.data import get_human_eval_plus, get_human_eval_plus_hash, get_mbpp_plus, get_mbpp_plus_hash

        if benchmark == "humaneval_plus":
            problems, digest = get_human_eval_plus(err_incomplete=False), get_human_eval_plus_hash()
        else:
            problems, digest = get_mbpp_plus(err_incomplete=False), get_mbpp_plus_hash()
        _problem_cache[key] = (problems, digest)
    return _problem_cache[key]


def code_rows(benchmark: str, data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """lm-eval docs for a code benchmark: `{task_id, prompt, entry_point, dataset}` in evalplus order."""
    problems, _ = load_problems(benchmark, data_dir)
    dataset = CODE_BENCHMARKS[benchmark][0]
    return [
        {"task_id": task_id, "prompt": problem["prompt"], "entry_point": problem["entry_point"], "dataset": dataset}
        for task_id, problem in problems.items()
    ]


def expected_output(benchmark: str, task_id: str, data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Ground-truth outputs and reference times for one problem (evalplus `get_groundtruth`), cached on disk per
    dataset hash and problem."""
    problems, digest = load_problems(benchmark, data_dir)
    if task_id not in problems:
        raise BenchmarkDataError(f"{benchmark} has no problem {task_id!r}.")
    import evalplus.evaluate as evaluate
    from evalplus.eval._special_oracle import MBPP_OUTPUT_NOT_NONE_TASKS

    folder = cache_dir() / "evalplus_groundtruth"
    folder.mkdir(parents=True, exist_ok=True)
    hashcode = f"{digest}-{re.sub(r'[^A-Za-z0-9_.-]', '_', task_id)}"
    cached = folder / f"{hashcode}.pkl"
    if cached.is_file():
        with cached.open("rb") as handle:
            return pickle.load(handle)[task_id]
    not_none = MBPP_OUTPUT_NOT_NONE_TASKS if CODE_BENCHMARKS[benchmark][0] == "mbpp" else []
    original = evaluate.CACHE_DIR
    evaluate.CACHE_DIR = str(folder)  # get_groundtruth caches under its module constant: aim it at our cache
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return evaluate.get_groundtruth({task_id: problems[task_id]}, hashcode, not_none)[task_id]
    finally:
        evaluate.CACHE_DIR = original


def build_solution(code: str, prompt: str, entry_point: str) -> str:
    """A runnable program from extracted code: a full definition of `entry_point` is kept as written (with the
    prompt's import lines in front, which instruct models often omit); anything else is taken as a completion of
    the prompt (the function body), as base models write it."""
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        imports = [line for line in prompt.splitlines() if re.match(r"^(import|from)\s+\S+", line)]
        return "\n".join(imports + [code]) + "\n"
    return prompt + code + "\n"


def run_guarded_check(
    dataset: str, problem: dict[str, Any], solution: str, expected: dict[str, Any], wall_seconds: float | None = None
) -> CodeVerdict:
    """Check one solution against evalplus base and plus tests inside the guards described in the module docstring.
    `wall_seconds` overrides the hard limit (default: derived from the problem's reference times)."""
    limit = wall_seconds if wall_seconds is not None else _wall_clock_limit(expected)
    payload = pickle.dumps((dataset, problem, solution, expected))
    with tempfile.TemporaryDirectory(prefix="diffmas-code-") as workdir:
        worker = subprocess.Popen(
            [sys.executable, "-m", "diffmas_eval.benchmarks._code_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=workdir,
            start_new_session=True,  # its own process group: one killpg reaches everything the candidate started
        )
        try:
            output, _ = worker.communicate(payload, timeout=limit)
        except subprocess.TimeoutExpired:
            _kill_group(worker.pid)
            output, _ = worker.communicate()
        finally:
            _kill_group(worker.pid)
            worker.wait()
    try:
        base, plus = pickle.loads(output)
    except Exception:  # no verdict: killed at the wall-clock limit or by the memory cap
        return CodeVerdict("timeout", "timeout")
    return CodeVerdict(base or "timeout", plus or "timeout")


def _wall_clock_limit(expected: dict[str, Any]) -> float:
    """An upper bound on evalplus's own limits (per phase: min(60, sum of per-test limits) + 3 s) plus start-up."""
    from evalplus.config import DEFAULT_GT_TIME_LIMIT_FACTOR, DEFAULT_MIN_TIME_LIMIT

    total = _STARTUP_SECONDS
    for phase in ("base_time", "plus_time"):
        limits = sum(max(DEFAULT_MIN_TIME_LIMIT, DEFAULT_GT_TIME_LIMIT_FACTOR * t) for t in expected[phase])
        total += min(60.0, limits) + 3.0
    return total


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def check_solution(benchmark: str, task_id: str, code: str, data_dir: str | os.PathLike | None = None) -> CodeVerdict:
    """Score extracted `code` for one problem of `benchmark` (`humaneval_plus` or `mbpp_plus`)."""
    problems, _ = load_problems(benchmark, data_dir)
    problem = problems[task_id]
    solution = build_solution(code, problem["prompt"], problem["entry_point"])
    expected = expected_output(benchmark, task_id, data_dir)
    return run_guarded_check(CODE_BENCHMARKS[benchmark][0], problem, solution, expected)
