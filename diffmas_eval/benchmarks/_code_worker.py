"""The warm code-scoring worker: one long-lived interpreter with evalplus imported, started by `code_exec`, that
scores each solution in a fresh sandbox forked from itself (`sandbox.spawn_confined`).

Run as `python -m diffmas_eval.benchmarks._code_worker POLICY` (`auto`, `full` or `guard-only`). Protocol on its
stdin/stdout, one length-prefixed pickle per message (`write_frame` / `FrameReader`):
- worker -> caller, once: `{"support": SandboxSupport fields, "namespaces": bool}` after probing the kernel;
- caller -> worker: `(check_id, wall_seconds, payload)`, `payload` = pickled `(dataset, problem, solution, expected,
  memory_setting)`; only the confined child unpickles it, so the worker never holds a problem's data for long;
- worker -> caller: `(check_id, base_status, plus_status)`, statuses `pass`, `fail`, `timeout` or `error`.
The verdict leaves the sandbox as the exit status of its PID 1 (a channel that nothing the candidate starts can hold
open); every wait has a deadline. End of input stops the worker and everything it started.

Inside the sandbox, evalplus's base and plus tests run as its evaluator runs them (`check_correctness`), with
two changes made here, not in evalplus: its guard also calls `sandbox.confine_candidate` and nulls spawning, socket,
`ctypes` and `posix` names; and its HumanEval/32 (`find_zero`) oracle records a passed input (evalplus
0.3.1 ends that oracle with `continue`, which skips the bookkeeping, so even the canonical solution fails).
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from diffmas_eval.benchmarks import sandbox

_HEADER = struct.Struct(">Q")
_STATUSES = ("pass", "fail", "timeout")
_VERDICT_BASE = 10  # exit status = 10 + 3 * base + plus (statuses indexed in _STATUSES)
_SUPERVISOR_GRACE_SECONDS = 5.0  # the worker's backstop beyond the supervisor's own deadline


def write_frame(fd: int, message: Any) -> None:
    """Write one length-prefixed pickle to `fd` (blocking until all of it is written)."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


class FrameReader:
    """Reads length-prefixed pickles from a file descriptor with `select`-friendly, unbuffered reads."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = bytearray()

    def read_available(self) -> list[Any]:
        """Read what the descriptor has now (call when `select` says it is readable); the complete messages.
        Raises EOFError at end of input."""
        chunk = os.read(self.fd, 1 << 20)
        if not chunk:
            raise EOFError("the other end closed the pipe")
        self._buffer += chunk
        messages = []
        while len(self._buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer)
            if len(self._buffer) < _HEADER.size + size:
                break
            messages.append(pickle.loads(bytes(self._buffer[_HEADER.size : _HEADER.size + size])))
            del self._buffer[: _HEADER.size + size]
        return messages


def encode_verdict(base_status: str | None, plus_status: str | None) -> int:
    """evalplus statuses as an exit status (None, evalplus's "no result", counts as a timeout)."""
    index = {status: i for i, status in enumerate(_STATUSES)}
    return _VERDICT_BASE + 3 * index.get(base_status or "timeout", 2) + index.get(plus_status or "timeout", 2)


def decode_verdict(status: int) -> tuple[str, str]:
    """The statuses behind an exit status: a verdict, or `timeout` (killed at the deadline or by a signal such as
    the memory cap) or `error` (the sandbox or evalplus failed before a verdict)."""
    if _VERDICT_BASE <= status < _VERDICT_BASE + 9:
        base, plus = divmod(status - _VERDICT_BASE, 3)
        return _STATUSES[base], _STATUSES[plus]
    if status in (sandbox.TIMED_OUT, sandbox.KILLED):
        return "timeout", "timeout"
    return "error", "error"


def _disable(module: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if hasattr(module, name):
            setattr(module, name, None)


def stricter_guard(evalplus_guard: Callable[[int | None], None], maximum_memory_bytes: int | None = None) -> None:
    """In the process about to execute candidate code: evalplus's `reliability_guard` (memory cap, destructive
    os/shutil calls, `open`, `subprocess.Popen`), then `sandbox.confine_candidate` (writes to scratch only, no new
    processes, signals to itself only), then convenience names: program execution, spawning, new sessions, socket
    creation and ctypes disabled, and every name disabled on `os` disabled on `posix` too (which `os` re-exports).
    File opening stays as evalplus leaves it: `io.open` is what imports read source files with, and the kernel
    already confines writes."""
    import _posixsubprocess
    import posix
    import socket

    evalplus_guard(maximum_memory_bytes)
    sandbox.confine_candidate(tempfile.gettempdir())
    _disable(os, ("execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "popen"))
    _disable(os, ("posix_spawn", "posix_spawnp", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle"))
    _disable(os, ("setsid", "setpgid", "setpgrp", "openpty"))
    _disable(posix, tuple(name for name in dir(posix) if getattr(os, name, True) is None))
    _disable(_posixsubprocess, ("fork_exec",))
    _disable(socket, ("socket", "socketpair", "create_connection", "create_server", "fromfd"))
    _disable(sys.modules["_socket"], ("socket", "socketpair"))
    for name in ("ctypes", "_ctypes", "pty"):
        sys.modules[name] = None  # type: ignore[assignment]


def unsafe_execute_with_find_zero_fix(evalplus_unsafe_execute: Callable[..., None], *args: Any) -> None:
    """evalplus's `unsafe_execute(dataset, entry_point, code, inputs, expected, time_limits, atol, fast_check, stat,
    details, progress)`, with HumanEval/32's oracle recording each input that passes it, as every other oracle
    does. Runs in evalplus's per-phase child, so the replacement of `_poly` stays there."""
    dataset, entry_point, atol, details, progress = args[0], args[1], args[6], args[9], args[10]
    if dataset == "humaneval" and entry_point == "find_zero":
        import evalplus.eval as evalplus_eval

        evaluate_polynomial = evalplus_eval._poly

        def poly_recording_pass(*poly_args: Any) -> float:
            value = evaluate_polynomial(*poly_args)
            if abs(value) <= atol:  # the oracle's assertion holds: record the pass its `continue` skips
                details[progress.value] = True
                progress.value += 1
            return value

        evalplus_eval._poly = poly_recording_pass
    evalplus_unsafe_execute(*args)


def check_correctness(
    dataset: str, problem: dict[str, Any], solution: str, expected: dict[str, Any]
) -> tuple[str | None, str | None]:
    """evalplus's `check_correctness(dataset, 0, problem, solution, expected, base_only=False, fast_check=True)`,
    as its evaluator calls it: the same two `evalplus.eval.untrusted_check` calls (base, then plus tests) with the
    same arguments and defaults. Written here so the worker need not import `evalplus.evaluate`, which imports
    `datasets` and `pandas` and makes the worker ten times larger and every fork slower. Returns the statuses."""
    from evalplus.eval import untrusted_check

    statuses = []
    for phase in ("base", "plus"):
        status, _ = untrusted_check(
            dataset,
            solution,
            problem[f"{phase}_input"],
            problem["entry_point"],
            expected=expected[phase],
            atol=problem["atol"],
            ref_time=expected[f"{phase}_time"],
            fast_check=True,
        )
        statuses.append(status)
    return statuses[0], statuses[1]


def _score(payload: bytes) -> int:
    """In the sandbox: run evalplus's base and plus tests on one solution; the verdict as an exit status."""
    import multiprocessing.heap

    dataset, problem, solution, expected, memory_setting = pickle.loads(payload)
    if memory_setting is None:
        os.environ.pop("EVALPLUS_MAX_MEMORY_BYTES", None)
    else:
        os.environ["EVALPLUS_MAX_MEMORY_BYTES"] = memory_setting
    scratch = os.getcwd()
    os.environ["TMPDIR"] = scratch
    tempfile.tempdir = scratch
    # evalplus's shared result arrays live in files: in scratch, not in /dev/shm.
    multiprocessing.heap.Arena._dir_candidates = []  # type: ignore[attr-defined]
    return encode_verdict(*check_correctness(dataset, problem, solution, expected))


@dataclass
class _Running:
    check_id: int
    pid: int
    backstop: float  # monotonic time after which the worker kills the supervisor itself
    scratch: str | None  # a per-check directory to remove afterwards (guard-only mode)


def serve(requests_fd: int, replies_fd: int, support: sandbox.SandboxSupport, namespaces: bool, root: str) -> None:
    """Answer check requests until end of input. With namespaces every check mounts its own tmpfs on `root`;
    without, each gets a fresh directory under `root`."""
    reader = FrameReader(requests_fd)
    running: dict[int, _Running] = {}  # pidfd -> check
    try:
        while True:
            now = time.monotonic()
            timeout = min((check.backstop - now for check in running.values()), default=None)
            ready, _, _ = select.select([requests_fd, *running], [], [], None if timeout is None else max(0, timeout))
            for fd in ready:
                if fd == requests_fd:
                    for check_id, wall_seconds, payload in reader.read_available():
                        scratch = root if namespaces else tempfile.mkdtemp(dir=root)
                        run = functools.partial(_score, payload)
                        pid = sandbox.spawn_confined(run, scratch, wall_seconds, support, namespaces)
                        backstop = time.monotonic() + wall_seconds + _SUPERVISOR_GRACE_SECONDS
                        running[os.pidfd_open(pid)] = _Running(check_id, pid, backstop, None if namespaces else scratch)
                else:
                    check = running.pop(fd)
                    os.close(fd)
                    statuses = decode_verdict(sandbox.wait_supervisor(check.pid))
                    if check.scratch:
                        shutil.rmtree(check.scratch, ignore_errors=True)
                    write_frame(replies_fd, (check.check_id, *statuses))
            for check in running.values():
                if time.monotonic() > check.backstop:  # the supervisor itself is stuck: its pidfd turns readable
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(check.pid, signal.SIGKILL)
    except EOFError:
        pass
    finally:
        for fd, check in running.items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(check.pid, signal.SIGKILL)  # its confined child dies with it (parent-death signal)
            sandbox.wait_supervisor(check.pid)
            os.close(fd)


def main() -> None:
    """Import evalplus once, probe the sandbox, report, then serve checks."""
    policy = sys.argv[1] if len(sys.argv) > 1 else "auto"
    requests_fd, replies_fd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)  # a stray print must never corrupt the protocol
    import multiprocessing

    import evalplus.eval  # imported once here, so every sandboxed check starts warm

    multiprocessing.set_start_method("fork", force=True)  # evalplus's per-phase child: a fork, as on Linux today
    evalplus.eval.reliability_guard = functools.partial(stricter_guard, evalplus.eval.reliability_guard)
    evalplus.eval.unsafe_execute = functools.partial(unsafe_execute_with_find_zero_fix, evalplus.eval.unsafe_execute)
    root = tempfile.mkdtemp(prefix="diffmas-sandbox-")
    try:
        support = sandbox.probe_support(root)
        namespaces = support.namespaces and policy != "guard-only"
        write_frame(replies_fd, {"support": support.as_dict(), "namespaces": namespaces})
        serve(requests_fd, replies_fd, support, namespaces, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
