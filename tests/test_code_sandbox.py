"""Hostile generated code in the sandbox: every route the independent check found (os, posix, ctypes, /proc, a
`setsid` child, a fork bomb, writes outside scratch, deletes under HOME, sockets, signals to the parent) is scored as
failing, within its limits, with nothing outside scratch changed, no connection arriving and no process left. Then
the sandbox's own guarantees (PID 1 takes every descendant with it, deadlines) and the loud guard-only fallback."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from diffmas_eval.benchmarks import code_exec, sandbox
from diffmas_eval.benchmarks.code_exec import CodeCheck, CodeSandboxError, check_solution, expected_output

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
MARKER = "4242.123"  # a sleep length no other process on the machine uses
ESCAPE = f"escape-{MARKER}-{os.getpid()}"  # a file name outside scratch that must never appear
WORKER_MODULE = "diffmas_eval.benchmarks._code_worker"
# Re-imports what the guard nulled: the candidate then holds raw libc and raw sockets, and only the kernel stops it.
RAW_LIBC = (
    "import sys\nfor name in ('ctypes', '_ctypes'):\n    sys.modules.pop(name, None)\n"
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "def check(result, what):\n    if result < 0:\n        raise OSError(ctypes.get_errno(), what)\n    return result\n"
)
RAW_SOCKET = "import sys\nfor name in ('socket', '_socket'):\n    sys.modules.pop(name, None)\nimport socket\n"


@pytest.fixture(autouse=True)
def _fixture_data(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFMAS_DATA_DIR", str(FIXTURES))
    monkeypatch.setenv("DIFFMAS_CACHE_DIR", str(tmp_path / "cache"))
    # evalplus's default 4 GiB cap: a lower one leaves no room to load ctypes, and the raw routes would fail early
    monkeypatch.delenv("EVALPLUS_MAX_MEMORY_BYTES", raising=False)
    monkeypatch.setenv("DIFFMAS_CODE_SANDBOX", "full")


@pytest.fixture
def home(tmp_path) -> Path:
    """A directory outside the sandbox's scratch standing in for HOME, with a file that must survive."""
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / "sentinel.txt").write_text("keep me")
    return folder


@pytest.fixture
def listeners(tmp_path):
    """A TCP and a UNIX-socket listener the candidate tries to reach; yields (port, path, sockets)."""
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    path = str(tmp_path / "listener.sock")
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(path)
    unix.listen(8)
    yield tcp.getsockname()[1], path, (tcp, unix)
    tcp.close()
    unix.close()


@pytest.fixture
def victim():
    """A process of the evaluating side that the candidate tries to kill."""
    process = subprocess.Popen(["sleep", "4343.5"])
    yield process
    process.kill()
    process.wait()


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def _sandbox_processes() -> set[int]:
    """Every process forked from a code worker (they keep its command line), and any sleep marked with MARKER."""
    found = set()
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if WORKER_MODULE in cmdline or MARKER in cmdline:
            found.add(process.pid)
    return found


def _add_all(body: str) -> str:
    indented = "\n".join("    " + line for line in body.splitlines())
    return f"def add_all(numbers):\n{indented}\n    return sum(numbers)\n"


def _assert_contained(body: str, home: Path, listeners=None, victims=()) -> None:
    """Score `body` (run before a correct `add_all`) and check every containment promise."""
    worker = code_exec._worker_pool.get()
    before_processes = _sandbox_processes()
    before_files = _snapshot(home)
    limit = code_exec._wall_clock_limit(expected_output("humaneval_plus", "HumanEval/0"))
    start = time.monotonic()
    verdict = check_solution("humaneval_plus", "HumanEval/0", _add_all(body))
    elapsed = time.monotonic() - start
    assert not verdict.pass_base and not verdict.pass_plus, verdict
    assert elapsed < limit, f"took {elapsed:.1f} s, limit {limit:.1f} s"
    assert _snapshot(home) == before_files
    assert _sandbox_processes() <= before_processes, "a process outlived its check"
    assert worker.alive() and code_exec._worker_pool.get() is worker, "the worker was killed or replaced"
    for listener in listeners or ():
        readable, _, _ = select.select([listener], [], [], 0.2)
        assert readable == [], "a connection arrived"
    for process in victims:
        assert process.poll() is None, "a process of the evaluating side was killed"


ESCAPES = {
    # os and posix: the guard's names, then the module `os` re-exports, which the old guard left usable
    "os.fork": "import os\nos.fork()",
    "os.system": f"import os\nos.system('sleep {MARKER} &')",
    "posix.fork": "import posix\nposix.fork()",
    "posix.fork-bomb": "import posix\nwhile True:\n    posix.fork()",
    "posix.setsid-child": "import posix, time\nif posix.fork() == 0:\n    posix.setsid()\n    time.sleep(30)",
    "posix.system": f"import posix\nposix.system('sleep {MARKER} &')",
    "posix.spawn": f"import posix\nposix.posix_spawn('/bin/sleep', ['sleep', '{MARKER}'], {{}})",
    "posix.execv": f"import posix\nposix.execv('/bin/sleep', ['sleep', '{MARKER}'])",
    "multiprocessing": "import multiprocessing, time\nmultiprocessing.Process(target=time.sleep, args=(30,)).start()",
    "subprocess": f"import subprocess\nsubprocess.Popen(['sleep', '{MARKER}'])",
    # ctypes, re-imported past the guard: raw libc
    "ctypes.fork-bomb": RAW_LIBC + "while True:\n    check(libc.fork(), 'fork')",
    "ctypes.fork-setsid": RAW_LIBC + "if check(libc.fork(), 'fork') == 0:\n    libc.setsid()\n    libc.sleep(30)",
    "ctypes.unshare": RAW_LIBC + "check(libc.unshare(0x10000000 | 0x00020000), 'unshare')",
    "ctypes.ptrace-parent": RAW_LIBC + "check(libc.ptrace(16, libc.getppid(), 0, 0), 'ptrace')",
}


def test_the_raw_routes_reach_the_kernel():
    """Controls: past the guard's names, raw libc and raw sockets load and work in the sandbox for harmless calls,
    so the attacks below fail because the kernel refuses them, not because the route is broken."""
    controls = [
        RAW_LIBC + "check(libc.getpid(), 'getpid')\ncheck(libc.open(b'/etc/hostname', 0), 'open for reading')",
        RAW_SOCKET + "left, right = socket.socketpair()\nleft.sendall(b'x')\nassert right.recv(1) == b'x'",
    ]
    for body in controls:
        assert check_solution("humaneval_plus", "HumanEval/0", _add_all(body)).pass_plus


@pytest.mark.parametrize("body", list(ESCAPES.values()), ids=list(ESCAPES))
def test_process_escapes_fail_and_leave_nothing(body, home):
    _assert_contained(body, home)


def test_the_issue_repro_finishes_within_the_wall_limit():
    """The issue's repro: a forked child that calls setsid and sleeps 30 s, with a 5 s wall limit, took 33.6 s."""
    problem = code_exec.load_problems("humaneval_plus")[0]["HumanEval/0"]
    body = "import posix, time\npid = posix.fork()\nif pid == 0:\n    posix.setsid()\n    time.sleep(30)"
    check = CodeCheck("humaneval", problem, _add_all(body), expected_output("humaneval_plus", "HumanEval/0"), 5)
    before = _sandbox_processes()
    start = time.monotonic()
    [verdict] = code_exec.run_checks([check])
    assert time.monotonic() - start < 5 + 2
    assert not verdict.pass_base and _sandbox_processes() <= before


FILE_ATTACKS = {
    "posix.open-write": "import posix\nfd = posix.open({new!r}, posix.O_WRONLY | posix.O_CREAT)\nposix.write(fd, b'x')",
    "posix.unlink": "import posix\nposix.unlink({sentinel!r})",
    "posix.rename": "import posix\nposix.rename({sentinel!r}, {new!r})",
    "posix.truncate": "import posix\nposix.truncate({sentinel!r}, 0)",
    "os.remove": "import os\nos.remove({sentinel!r})",
    "shutil.rmtree": "import shutil\nshutil.rmtree({home!r})",
    "pathlib.unlink": "import pathlib\npathlib.Path({sentinel!r}).unlink()",
    "open-write": "open({sentinel!r}, 'w').write('gone')",
    "io.open-write": "import io\nio.open({new!r}, 'w').write('x')",
    "ctypes.open-write": RAW_LIBC
    + "fd = check(libc.open({new!r}.encode(), 0o101, 0o644), 'open')\nlibc.write(fd, b'x', 1)",
    "ctypes.unlink": RAW_LIBC + "check(libc.unlink({sentinel!r}.encode()), 'unlink')",
    "ctypes.rmdir-home": RAW_LIBC + "check(libc.unlink({sentinel!r}.encode()), 'unlink')\n"
    "check(libc.rmdir({home!r}.encode()), 'rmdir')",
    "ctypes.write-tmp": RAW_LIBC + "check(libc.open(b'/tmp/{marker}', 0o101, 0o644), 'open')",
    "ctypes.write-device": RAW_LIBC + "check(libc.open(b'/dev/full', 0o1), 'open')",
}


@pytest.mark.parametrize("template", list(FILE_ATTACKS.values()), ids=list(FILE_ATTACKS))
def test_writes_outside_scratch_and_deletes_under_home_fail(template, home):
    body = template.format(
        sentinel=str(home / "sentinel.txt"), new=str(home / "new.txt"), home=str(home), marker=ESCAPE
    )
    _assert_contained(body, home)
    assert not Path(f"/tmp/{ESCAPE}").exists()


def test_sockets_to_a_listener_of_the_test_never_connect(home, listeners):
    port, path, sockets = listeners
    attempts = [
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
        f"import _socket\n_socket.socket().connect(('127.0.0.1', {port}))",
        RAW_SOCKET + f"socket.socket().connect(('127.0.0.1', {port}))",
        RAW_SOCKET + f"socket.socket(socket.AF_UNIX).connect({path!r})",
        RAW_LIBC + "check(libc.socket(2, 1, 0), 'socket')",
    ]
    for body in attempts:
        _assert_contained(body, home, listeners=sockets)


def test_signals_to_the_parent_worker_and_evaluator_fail(home, victim):
    worker_pid = code_exec._worker_pool.get().process.pid
    attempts = [
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        "import posix, signal\nposix.kill(posix.getppid(), signal.SIGKILL)",
        f"import posix, signal\nposix.kill({worker_pid}, signal.SIGKILL)",
        f"import posix, signal\nposix.kill({os.getpid()}, signal.SIGKILL)",
        f"import posix, signal\nposix.kill({victim.pid}, signal.SIGKILL)",
        RAW_LIBC + f"check(libc.kill({worker_pid}, 9), 'kill')",
        RAW_LIBC + f"check(libc.kill({victim.pid}, 9), 'kill')",
        RAW_LIBC + f"check(libc.open(b'/proc/{os.getpid()}/environ', 0), 'read the evaluator environment')",
        # /proc: look for the evaluating side's processes and signal them (only those: a broken sandbox must not
        # take the machine's other processes with it); found none, the body fails on its own
        RAW_LIBC + f"import os\ntargets = {{{os.getpid()}, {worker_pid}, {victim.pid}}}\n"
        "visible = [int(e) for e in os.listdir('/proc') if e.isdigit() and int(e) in targets]\n"
        "for pid in visible:\n    check(libc.kill(pid, 9), 'kill')\nassert visible, 'not visible in /proc'",
    ]
    for body in attempts:
        _assert_contained(body, home, victims=[victim])


# --- the sandbox itself, without evalplus or the candidate's filter --------------------------------------------


@pytest.fixture
def support(tmp_path) -> sandbox.SandboxSupport:
    found = sandbox.probe_support(str(_scratch(tmp_path)))
    assert found.full, f"the full sandbox is unavailable here: {found.problems}"
    return found


def _scratch(tmp_path: Path) -> Path:
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    return scratch


def _detach_and_sleep() -> None:
    """Fork a child that leaves the session and becomes a long `sleep` (the run's own filter allows that)."""
    if os.fork() == 0:
        os.setsid()
        os.execv("/bin/sleep", ["sleep", MARKER])


def _marked() -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"]) if MARKER in " ".join(p.info["cmdline"] or [])]


def test_pid_1_exiting_takes_a_detached_descendant_with_it(tmp_path, support):
    def run() -> int:
        _detach_and_sleep()
        time.sleep(0.5)  # the child has left the session and exec'd by now
        return 0

    start = time.monotonic()
    status = sandbox.wait_supervisor(sandbox.spawn_confined(run, str(_scratch(tmp_path)), 10.0, support, True))
    assert status == 0 and time.monotonic() - start < 5
    assert _marked() == []


def test_the_deadline_kills_pid_1_and_every_descendant(tmp_path, support):
    def run() -> int:
        _detach_and_sleep()
        time.sleep(60)
        return 0

    start = time.monotonic()
    status = sandbox.wait_supervisor(sandbox.spawn_confined(run, str(_scratch(tmp_path)), 2.0, support, True))
    assert status == sandbox.TIMED_OUT and time.monotonic() - start < 2 + 2
    assert _marked() == []


def test_the_run_sees_a_read_only_world_its_own_processes_and_its_own_scratch(tmp_path, support, home):
    evaluator = os.getpid()

    def run() -> int:
        with open("result.txt", "w") as handle:  # the working directory is the private scratch tmpfs
            handle.write("ok")
        Path(f"/dev/shm/{ESCAPE}").write_text("x")  # a private /dev/shm: the host's never sees it
        for path in (home / "new.txt", Path(f"/tmp/{ESCAPE}"), Path("/dev/full")):
            try:
                path.write_text("x")
                return 20
            except OSError:
                pass
        pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
        own_processes_only = os.getpid() == 1 and evaluator not in pids and max(pids) < 50
        return 21 if own_processes_only and socket_refused() else 22

    def socket_refused() -> bool:
        try:
            socket.socket()
        except PermissionError:
            return True
        return False

    scratch = _scratch(tmp_path)
    status = sandbox.wait_supervisor(sandbox.spawn_confined(run, str(scratch), 10.0, support, True))
    assert status == 21
    assert list(scratch.iterdir()) == [] and _snapshot(home) == {"sentinel.txt": b"keep me"}
    leaked = [path for path in (Path(f"/dev/shm/{ESCAPE}"), Path(f"/tmp/{ESCAPE}")) if path.exists()]
    for path in leaked:
        path.unlink()
    assert leaked == []


def test_isolate_filesystem_refuses_to_run_outside_a_new_pid_namespace(tmp_path):
    """The check that keeps a caller's mistake from remounting the host read-only. Tried in new namespaces (but
    not as their PID 1), so that a broken check would only touch a private mount table."""
    scratch = str(_scratch(tmp_path))
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            sandbox.enter_namespaces()
            sandbox.isolate_filesystem(scratch, 1 << 20)
        except sandbox.SandboxError as error:
            status = 0 if "outside a new user and PID namespace" in str(error) else 3
        except BaseException:  # noqa: BLE001
            status = 2
        os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# --- the fallback ------------------------------------------------------------------------------------------------


@pytest.fixture
def refused_namespaces(tmp_path, monkeypatch):
    """The worker starts under a seccomp filter that refuses `unshare`, as some containers do."""
    launcher = tmp_path / "no_namespaces.py"
    launcher.write_text(
        "import ctypes, errno, os, sys\nimport pyseccomp\n"
        "ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)\n"
        "rules = pyseccomp.SyscallFilter(pyseccomp.ALLOW)\n"
        "rules.add_rule(pyseccomp.ERRNO(errno.EPERM), 'unshare')\nrules.load()\n"
        f"os.execv(sys.executable, [sys.executable, '-m', '{WORKER_MODULE}', *sys.argv[1:]])\n"
    )
    code_exec.close_worker()
    monkeypatch.setattr(code_exec, "_worker_command", lambda policy: [sys.executable, str(launcher), policy])
    yield
    code_exec.close_worker()


def test_refused_namespaces_fall_back_to_the_guard_loudly(refused_namespaces, monkeypatch, home):
    monkeypatch.setenv("DIFFMAS_CODE_SANDBOX", "auto")
    with pytest.warns(RuntimeWarning, match="sandbox: guard-only.*namespaces refused"):
        assert check_solution(
            "humaneval_plus", "HumanEval/0", "def add_all(numbers):\n    return sum(numbers)"
        ).pass_plus
    status = code_exec.sandbox_status()
    assert status["sandbox"] == "guard-only" and "namespaces refused" in status["warning"]
    # Landlock and seccomp still hold without namespaces.
    for body in (ESCAPES["posix.setsid-child"], ESCAPES["posix.fork-bomb"], ESCAPES["ctypes.fork-setsid"]):
        _assert_contained(body, home)
    _assert_contained(FILE_ATTACKS["ctypes.unlink"].format(sentinel=str(home / "sentinel.txt")), home)


def test_full_policy_refuses_to_run_without_namespaces(refused_namespaces, monkeypatch):
    with pytest.raises(CodeSandboxError, match="DIFFMAS_CODE_SANDBOX=full, but .*namespaces refused"):
        code_exec.code_rows("humaneval_plus")  # before any generation: when the task's documents load
    with pytest.raises(CodeSandboxError, match="unset DIFFMAS_CODE_SANDBOX"):
        check_solution("humaneval_plus", "HumanEval/0", "def add_all(numbers):\n    return 0")


def test_guard_only_on_request_is_recorded_and_warned(monkeypatch):
    code_exec.close_worker()
    monkeypatch.setenv("DIFFMAS_CODE_SANDBOX", "guard-only")
    with pytest.warns(RuntimeWarning, match="sandbox: guard-only"):
        assert check_solution(
            "humaneval_plus", "HumanEval/0", "def add_all(numbers):\n    return sum(numbers)"
        ).pass_plus
    assert code_exec.sandbox_status()["sandbox"] == "guard-only"
    code_exec.close_worker()


def test_the_backends_record_the_fallback_in_the_results_config(monkeypatch, tiny_model_dir, tmp_path):
    """lm-eval merges `get_model_info()` into `results["config"]`: after code ran without the full sandbox, our
    backends put `code_sandbox` there, with the warning."""
    from diffmas_eval.lm_backend import SingleAgentLM

    code_exec.close_worker()
    monkeypatch.setenv("DIFFMAS_CODE_SANDBOX", "guard-only")
    with pytest.warns(RuntimeWarning, match="sandbox: guard-only"):
        check_solution("humaneval_plus", "HumanEval/0", "def add_all(numbers):\n    return 0")
    lm = SingleAgentLM(pretrained=str(tiny_model_dir), device="cpu", sidecar=str(tmp_path / "sidecar.jsonl"))
    recorded = lm.get_model_info()["code_sandbox"]
    assert recorded["sandbox"] == "guard-only" and "did not run in the full sandbox" in recorded["warning"]
    code_exec.close_worker()


def teardown_module() -> None:
    code_exec.close_worker()
