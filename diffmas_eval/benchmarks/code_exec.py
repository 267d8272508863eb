"""Score generated code with EvalPlus (HumanEval+, MBPP+) inside a kernel-level sandbox, one solution or many.

Every check runs evalplus's own `check_correctness` (base and plus tests, per-test time limits, its address-space cap
`EVALPLUS_MAX_MEMORY_BYTES`, default 4 GiB, and its `reliability_guard`) in a fresh sandbox (`sandbox.py`): new user,
PID, network, mount, IPC and UTS namespaces with the check as PID 1, a read-only file system except a private tmpfs
scratch directory, Landlock, seccomp, rlimits and no capabilities. The sandboxes are forked from one warm worker
(`_code_worker.py`, evalplus imported once), never from the evaluating process, whose model memory alone would
exceed the cap. The verdict leaves as the exit status of the sandbox's PID 1 and every wait has a deadline, so no
candidate can hang the evaluation; several checks run at once in `score_programs`.

Where the kernel refuses namespaces (some containers), checks run with evalplus's guard plus whatever Landlock and
seccomp allow, after one loud warning (`sandbox: guard-only` in `sandbox_status()`, which our backends put in the
results config). `DIFFMAS_CODE_SANDBOX=full` refuses to run without the complete sandbox; `guard-only` asks for
the fallback; `auto` (default) uses the best the kernel allows.

Data: the evalplus release files are read from the data directory (`humanevalplus/HumanEvalPlus-v0.1.10.jsonl`,
`mbppplus/MbppPlus-v0.2.0.jsonl`) by pointing `HUMANEVAL_OVERRIDE_PATH` / `MBPP_OVERRIDE_PATH` at them; without a
data directory evalplus uses its own cache or download (`~/.cache/evalplus`). Expected outputs are computed once per
problem with evalplus's `get_groundtruth` and cached under `diffmas_eval.paths.cache_dir()/evalplus_groundtruth`.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import pickle
import re
import select
import signal
import subprocess
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffmas_eval.benchmarks._code_worker import FrameReader, write_frame
from diffmas_eval.benchmarks.sandbox import SandboxSupport
from diffmas_eval.benchmarks.sources import LOCAL_FILES, BenchmarkDataError, _offline, local_file, resolve_data_dir
from diffmas_eval.paths import DATA_DIR_ENV, cache_dir

# benchmark -> (evalplus dataset name, override variable, evalplus file name)
CODE_BENCHMARKS: dict[str, tuple[str, str, str]] = {
    "humaneval_plus": ("humaneval", "HUMANEVAL_OVERRIDE_PATH", "HumanEvalPlus-v0.1.10.jsonl"),
    "mbpp_plus": ("mbpp", "MBPP_OVERRIDE_PATH", "MbppPlus-v0.2.0.jsonl"),
}
SANDBOX_ENV = "DIFFMAS_CODE_SANDBOX"
SANDBOX_POLICIES = ("auto", "full", "guard-only")
_STARTUP_SECONDS = 5.0  # forking and entering the sandbox on a loaded machine, on top of evalplus's own limits
_WORKER_START_SECONDS = 120.0  # interpreter start, evalplus imports and the kernel probe on a loaded machine
_WORKER_GRACE_SECONDS = 15.0  # how long past a check's own deadline the worker may take to answer
_problem_cache: dict[tuple[str, str], tuple[dict[str, dict[str, Any]], str]] = {}


class CodeSandboxError(RuntimeError):
    """Generated code cannot be scored as asked (the full sandbox is required but unavailable, or the worker
    cannot start)."""


@dataclass(frozen=True)
class CodeVerdict:
    """EvalPlus verdicts for one solution: status is `pass`, `fail` or `timeout` for the base and plus tests
    (`error` when the sandbox or evalplus failed before a verdict, which counts as a failure)."""

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
    """lm-eval docs for a code benchmark: `{task_id, prompt, entry_point, dataset}` in evalplus order. With
    `DIFFMAS_CODE_SANDBOX=full` this starts the sandbox first, so a kernel without it fails before generation."""
    problems, _ = load_problems(benchmark, data_dir)
    if sandbox_policy() == "full":
        _worker_pool.get()
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


@dataclass(frozen=True)
class CodeCheck:
    """One program to run against one evalplus problem's base and plus tests."""

    dataset: str  # evalplus dataset name: `humaneval` or `mbpp`
    problem: dict[str, Any]
    solution: str
    expected: dict[str, Any]  # `expected_output(...)`
    wall_seconds: float | None = None  # hard limit; None derives it from the problem's reference times


def sandbox_policy() -> str:
    """`$DIFFMAS_CODE_SANDBOX`: `auto` (default), `full` (refuse to run without the complete sandbox) or
    `guard-only` (evalplus's guard with Landlock and seccomp where available, no namespaces)."""
    policy = os.environ.get(SANDBOX_ENV, "").strip().lower() or "auto"
    if policy not in SANDBOX_POLICIES:
        raise CodeSandboxError(
            f"{SANDBOX_ENV}={policy!r} is not one of {', '.join(SANDBOX_POLICIES)}; fix or unset it."
        )
    return policy


def sandbox_status() -> dict[str, Any] | None:
    """How generated code is being run, for the results config: `sandbox` (`full`, `partial`: namespaces without
    seccomp, or `guard-only`), the policy, the active layers and what is missing; None before any code ran."""
    return _worker_pool.status


def close_worker() -> None:
    """Stop the warm worker (it also stops when this process exits); the next check starts a new one."""
    _worker_pool.close()


def default_parallel() -> int:
    """Checks at once when not told: half the cores, as evalplus's evaluator does."""
    return max(1, (os.cpu_count() or 2) // 2)


class _WorkerDied(Exception):
    pass


def _worker_command(policy: str) -> list[str]:
    return [sys.executable, "-m", "diffmas_eval.benchmarks._code_worker", policy]


class _Worker:
    """One warm worker process (`_code_worker`) and the pipes to it; every wait on it has a deadline."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        threads = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        self.process = subprocess.Popen(
            _worker_command(policy),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, **threads},  # fork-per-check wants a single-threaded worker
            start_new_session=True,
        )
        self._reader = FrameReader(self.process.stdout.fileno())
        self._inbox: deque[Any] = deque()
        try:
            hello = self.receive(_WORKER_START_SECONDS)
        except _WorkerDied:
            hello = None
        if hello is None:
            self.kill()
            raise CodeSandboxError(
                f"the code-scoring worker did not start (within {_WORKER_START_SECONDS:.0f} s); run "
                f"`{sys.executable} -m diffmas_eval.benchmarks._code_worker` to see why."
            )
        self.support = SandboxSupport(**{**hello["support"], "problems": tuple(hello["support"]["problems"])})
        self.namespaces: bool = hello["namespaces"]

    @property
    def sandbox(self) -> str:
        if not self.namespaces:
            return "guard-only"
        return "full" if self.support.full else "partial"

    def send(self, message: Any) -> None:
        try:
            write_frame(self.process.stdin.fileno(), message)
        except (BrokenPipeError, OSError) as error:
            raise _WorkerDied() from error

    def receive(self, timeout: float) -> Any | None:
        """The next message, or None after `timeout` seconds; raises _WorkerDied at end of output."""
        deadline = time.monotonic() + timeout
        while not self._inbox:
            remaining = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._reader.fd], [], [], remaining)
            if ready:
                try:
                    self._inbox.extend(self._reader.read_available())
                except EOFError as error:
                    raise _WorkerDied() from error
            elif remaining == 0:
                return None
        return self._inbox.popleft()

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        """End of input stops the worker and everything it started; kill it if it takes longer than 10 s."""
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
        with contextlib.suppress(OSError):
            self.process.stdout.close()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # the worker's sandboxes die with it (parent-death signal)
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                pipe.close()


class _WorkerPool:
    """This process's one warm worker: started on first use (applying the sandbox policy) and replaced when the
    policy changes or the worker stops answering."""

    def __init__(self) -> None:
        self.worker: _Worker | None = None
        self.status: dict[str, Any] | None = None

    def get(self) -> _Worker:
        policy = sandbox_policy()
        if self.worker is not None and (self.worker.policy != policy or not self.worker.alive()):
            self.close()
        if self.worker is None:
            worker = _Worker(policy)
            if policy == "full" and worker.sandbox != "full":
                worker.close()
                raise CodeSandboxError(
                    f"{SANDBOX_ENV}=full, but this machine cannot give generated code the full sandbox "
                    f"({'; '.join(worker.support.problems)}): allow unprivileged user namespaces (e.g. "
                    "`sysctl kernel.unprivileged_userns_clone=1`, or a container started with them) and install "
                    f"libseccomp and pyseccomp, or unset {SANDBOX_ENV} to accept evalplus's guard with a warning."
                )
            self.status = {
                "sandbox": worker.sandbox,
                "policy": policy,
                "layers": worker.support.layers(worker.namespaces) + ["evalplus reliability_guard"],
                "missing": list(worker.support.problems),
            }
            if worker.sandbox != "full":
                self.status["warning"] = "generated code did not run in the full sandbox: " + (
                    "; ".join(worker.support.problems) or f"{SANDBOX_ENV}={policy}"
                )
                warnings.warn(f"sandbox: {worker.sandbox}. {self.status['warning']}", RuntimeWarning, stacklevel=3)
            self.worker = worker
        return self.worker

    def replace(self) -> _Worker:
        if self.worker is not None:
            self.worker.kill()
            self.worker = None
        return self.get()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None


_worker_pool = _WorkerPool()
atexit.register(_worker_pool.close)


def run_checks(checks: Sequence[CodeCheck], parallel: int | None = None) -> list[CodeVerdict]:
    """Run `checks` in the sandbox, up to `parallel` at once (default `default_parallel()`); verdicts in input
    order. A check that outlives its wall-clock limit is a timeout; if the worker itself stops answering it is
    replaced, and the checks it held run once more."""
    return _run_lazily(len(checks), checks.__getitem__, parallel)


def _run_lazily(count: int, prepare: Callable[[int], CodeCheck], parallel: int | None) -> list[CodeVerdict]:
    """`run_checks` for checks built on demand: check `i` is built by `prepare(i)` just before it is sent, or while
    the worker runs earlier ones, so that computing ground truth overlaps scoring."""
    parallel = parallel or default_parallel()
    verdicts: list[CodeVerdict | None] = [None] * count
    queue = deque(range(count))
    built: dict[int, tuple[float, bytes]] = {}  # index -> (wall-clock limit, payload), built and not yet sent
    deadlines: dict[int, float] = {}  # index of a check in flight -> when the worker must have answered
    retried: set[int] = set()

    def build(index: int) -> tuple[float, bytes]:
        if index not in built:
            check = prepare(index)
            wall = check.wall_seconds if check.wall_seconds is not None else _wall_clock_limit(check.expected)
            built[index] = (wall, _payload(check))
        return built[index]

    worker = _worker_pool.get()
    while queue or deadlines:
        try:
            while queue and len(deadlines) < parallel:
                index = queue.popleft()
                wall, payload = build(index)
                del built[index]
                deadlines[index] = time.monotonic() + wall + _WORKER_GRACE_SECONDS
                worker.send((index, wall, payload))
            if queue:
                build(queue[0])  # while the worker runs the checks in flight
            reply = worker.receive(min(deadlines.values()) - time.monotonic())
        except _WorkerDied:
            reply = None
        if reply is not None:
            index, base, plus = reply
            deadlines.pop(index)
            verdicts[index] = CodeVerdict(base, plus)
            continue
        now = time.monotonic()
        for index, deadline in deadlines.items():
            if deadline <= now:
                verdicts[index] = CodeVerdict("timeout", "timeout")
            elif index in retried:
                verdicts[index] = CodeVerdict("error", "error")
            else:
                retried.add(index)
                queue.appendleft(index)
        deadlines.clear()
        worker = _worker_pool.replace()
    errors = sum(verdict.base_status == "error" for verdict in verdicts if verdict)
    if errors:
        warnings.warn(
            f"{errors} code check(s) ended without a verdict; they count as failures", RuntimeWarning, stacklevel=2
        )
    return [verdict for verdict in verdicts if verdict is not None]


def _payload(check: CodeCheck) -> bytes:
    """What the sandbox unpickles: the check and the memory cap setting of the evaluating process."""
    memory = os.environ.get("EVALPLUS_MAX_MEMORY_BYTES")
    return pickle.dumps((check.dataset, check.problem, check.solution, check.expected, memory), protocol=5)


def _wall_clock_limit(expected: dict[str, Any]) -> float:
    """An upper bound on evalplus's own limits (per phase: min(60, sum of per-test limits) + 3 s) plus start-up."""
    from evalplus.config import DEFAULT_GT_TIME_LIMIT_FACTOR, DEFAULT_MIN_TIME_LIMIT

    total = _STARTUP_SECONDS
    for phase in ("base_time", "plus_time"):
        limits = sum(max(DEFAULT_MIN_TIME_LIMIT, DEFAULT_GT_TIME_LIMIT_FACTOR * t) for t in expected[phase])
        total += min(60.0, limits) + 3.0
    return total


def score_programs(
    benchmark: str,
    programs: Sequence[tuple[str, str]],
    data_dir: str | os.PathLike | None = None,
    parallel: int | None = None,
) -> list[CodeVerdict]:
    """Score complete programs `[(task_id, program), ...]` of `benchmark` (`humaneval_plus` or `mbpp_plus`),
    several at once; ground truth is computed once per problem and cached, while earlier programs are scored.
    Verdicts in input order."""
    problems, _ = load_problems(benchmark, data_dir)
    dataset = CODE_BENCHMARKS[benchmark][0]
    for task_id, _ in programs:
        if task_id not in problems:
            raise BenchmarkDataError(f"{benchmark} has no problem {task_id!r}.")

    def prepare(index: int) -> CodeCheck:
        task_id, program = programs[index]
        return CodeCheck(dataset, problems[task_id], program, expected_output(benchmark, task_id, data_dir))

    return _run_lazily(len(programs), prepare, parallel)


def check_solution(benchmark: str, task_id: str, code: str, data_dir: str | os.PathLike | None = None) -> CodeVerdict:
    """Score extracted `code` for one problem of `benchmark` (`humaneval_plus` or `mbpp_plus`)."""
    problems, _ = load_problems(benchmark, data_dir)
    if task_id not in problems:
        raise BenchmarkDataError(f"{benchmark} has no problem {task_id!r}.")
    problem = problems[task_id]
    solution = build_solution(code, problem["prompt"], problem["entry_point"])
    return score_programs(benchmark, [(task_id, solution)], data_dir, parallel=1)[0]
