"""Child process of `code_exec.run_guarded_check`: read one pickled check from stdin, run evalplus's
`check_correctness` with a stricter guard, write the pickled `(base_status, plus_status)` to stdout.

Run as `python -m diffmas_eval.benchmarks._code_worker`; the parent starts it in its own session and kills the
whole process group afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import pickle
import sys
from collections.abc import Callable
from typing import Any


def _disable(module: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if hasattr(module, name):
            setattr(module, name, None)


def stricter_guard(evalplus_guard: Callable[[int | None], None], maximum_memory_bytes: int | None = None) -> None:
    """evalplus's `reliability_guard` (memory cap, destructive os/shutil calls, `open`, `subprocess.Popen`
    disabled), plus: no new programs or process spawning, no leaving the process group, no sockets, no ctypes, no
    other way to open or write files. Imports keep working: they read through `io.open_code`."""
    import _io
    import _posixsubprocess
    import socket

    evalplus_guard(maximum_memory_bytes)
    _disable(os, ("execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "popen"))
    _disable(os, ("posix_spawn", "posix_spawnp", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle"))
    _disable(os, ("setsid", "setpgid", "setpgrp", "open", "openpty", "link", "symlink", "mkfifo", "mknod", "write"))
    _disable(_posixsubprocess, ("fork_exec",))
    _disable(socket, ("socket", "socketpair", "create_connection", "create_server", "fromfd"))
    _disable(sys.modules["_socket"], ("socket", "socketpair"))
    _disable(io, ("open", "FileIO"))
    _disable(_io, ("open", "FileIO"))
    for name in ("ctypes", "_ctypes", "pty"):
        sys.modules[name] = None  # type: ignore[assignment]


def main() -> None:
    """Read the check, run it, write the verdict."""
    dataset, problem, solution, expected = pickle.load(sys.stdin.buffer)
    result_stream = sys.stdout.buffer
    import evalplus.eval
    from evalplus.evaluate import check_correctness

    # evalplus's child looks the guard up in its module at call time, so this replaces it for the candidate only.
    evalplus.eval.reliability_guard = functools.partial(stricter_guard, evalplus.eval.reliability_guard)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        result = check_correctness(dataset, 0, problem, solution, expected, base_only=False)
    pickle.dump((result["base"][0], result["plus"][0]), result_stream)
    result_stream.flush()


if __name__ == "__main__":
    main()
