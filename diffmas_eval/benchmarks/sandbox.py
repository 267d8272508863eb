"""Run untrusted code in a kernel-level sandbox on Linux: one fresh sandbox per run, forked from a warm process.

`spawn_confined(run, ...)` forks a supervisor that waits for the run with a wall-clock deadline. With `namespaces`,
the supervisor first enters new user, mount, PID, network, IPC and UTS namespaces, so the run is PID 1 of its own PID
namespace: when it exits or is killed, the kernel kills every process left in the namespace, however it detached
(`setsid`, double fork), before the supervisor's wait returns. The run then, in order:
- makes every mount read-only, `nosuid` and `nodev`, mounts size-capped private tmpfs on `scratch` (its working and
  temporary directory) and `/dev/shm`, a fresh read-only `/proc` showing only its own processes, and
  `/dev/{null,zero,random,urandom}`;
- (both modes) sets rlimits (no core files, file size and open files capped), `no_new_privs`, a Landlock ruleset that
  allows writing only under `scratch`, `/dev/shm` and `/dev/null` (where the kernel has Landlock), drops every
  capability, and
  loads seccomp filter A: no socket creation, no new namespaces or mounts, no ptrace or cross-process memory access,
  no bpf, perf, io_uring, userfaultfd, keyrings, kexec or kernel modules;
- calls `run()`; its return value is the exit status the supervisor reports.
`confine_candidate(scratch)` adds, in the process that executes candidate code, a Landlock layer without `/dev/shm`
and seccomp filter B: no new processes or programs (threads stay allowed), and signals only to itself.

Without namespaces (the kernel or a container refuses them) the run gets the same rlimits, Landlock and seccomp
layers where available, in its own session that the supervisor kills as a group: that is the `guard-only` fallback.

Mechanism: the namespaces and mounts use the kernel calls `bwrap` makes (`unshare`, `mount_setattr`, `mount`) from
this process, through ctypes (`os.unshare` only exists from Python 3.12), because `bwrap` and `nsjail` create a
sandbox by executing a new program, which would mean a fresh interpreter and fresh imports per run; Landlock and
seccomp use the `landlock` and `pyseccomp` packages (the latter over the system's libseccomp).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource
import select
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080
CLONE_THREAD = 0x00010000
_NEW_NAMESPACES = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_BIND, _MS_REC, _MS_PRIVATE = 1, 2, 4, 8, 4096, 0x4000, 1 << 18
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
_AT_FDCWD, _AT_RECURSIVE = -100, 0x8000
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture (syscalls added after 5.1 share one table)
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38
_CAPABILITY_VERSION_3 = 0x20080522
_DEVICES = ("null", "zero", "random", "urandom")
_SHM_BYTES = 16 << 20  # multiprocessing's semaphores (evalplus's result counters) live in /dev/shm

# Exit statuses a supervisor reports besides the run's own (a run must not use these three).
SETUP_FAILED = 1  # the sandbox could not be set up, or the run raised
TIMED_OUT = 2  # killed at the wall-clock deadline
KILLED = 3  # the run died from a signal (the memory cap, a crash)

# Filter A, for the run and everything it starts: kernel surface that namespaces do not take away.
_DENIED_SYSCALLS = (
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "mount_setattr", "move_mount", "open_tree",
    "fsopen", "fsconfig", "fsmount", "fspick", "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "keyctl",
    "add_key", "request_key", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "syslog", "iopl", "ioperm", "open_by_handle_at",
    "name_to_handle_at", "fanotify_init", "socket",
)  # fmt: skip
# Filter B, for the process that executes candidate code.
_NO_NEW_PROCESSES = ("fork", "vfork", "execve", "execveat", "pidfd_open", "pidfd_send_signal")
_SIGNALS_TO_SELF_ONLY = ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class SandboxError(OSError):
    """A sandbox step the kernel refused."""


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]  # fmt: skip


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


@dataclass(frozen=True)
class SandboxSupport:
    """What this kernel and installation allow: namespaces (user, mount, PID, net, IPC, UTS with the mounts above),
    the Landlock ABI version (0: none) and seccomp filters; `problems` says why any of them is missing."""

    namespaces: bool
    landlock_abi: int
    seccomp: bool
    problems: tuple[str, ...] = ()

    @property
    def full(self) -> bool:
        """The complete sandbox: namespaces and seccomp (Landlock is an extra layer where the kernel has it)."""
        return self.namespaces and self.seccomp

    def layers(self, namespaces: bool) -> list[str]:
        """The layers a run gets, outermost first, when run with or without namespaces."""
        layers = []
        if namespaces and self.namespaces:
            layers += ["user/pid/net/mount/ipc/uts namespaces", "read-only mounts, private scratch tmpfs and /proc"]
        if self.landlock_abi:
            layers.append(f"landlock (abi {self.landlock_abi}): writes only to scratch")
        if self.seccomp:
            layers.append("seccomp: no sockets, namespaces, mounts, ptrace; candidate: no processes, signals to self")
        return layers + ["rlimits", "no capabilities"]

    def as_dict(self) -> dict:
        return {**asdict(self), "problems": list(self.problems)}


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise SandboxError(code, f"{what}: {os.strerror(code)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda text: text.encode() if text is not None else None  # noqa: E731
    _check(_libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)), f"mount {target}")


def _mount_setattr(path: str, set_flags: int, clear_flags: int = 0, recursive: bool = True) -> None:
    attr = _MountAttr(set_flags, clear_flags, 0, 0)
    flags = _AT_RECURSIVE if recursive else 0
    result = _libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr))
    _check(int(result), f"mount_setattr {path}")


def _prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, value, 0, 0, 0), f"prctl {option}")


def enter_namespaces() -> None:
    """Move this (single-threaded) process into new user, mount, PID, net, IPC and UTS namespaces, mapping its own
    uid and gid; its next child is PID 1 of the new PID namespace."""
    uid, gid = os.getuid(), os.getgid()
    if hasattr(os, "unshare"):  # Python 3.12+
        os.unshare(_NEW_NAMESPACES)
    else:
        _check(_libc.unshare(_NEW_NAMESPACES), "unshare")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as handle:
            handle.write(text)


def isolate_filesystem(scratch: str, scratch_bytes: int) -> None:
    """In the new mount namespace (as PID 1 of the new PID namespace): a read-only, nosuid, nodev view of every
    mount, a private tmpfs on `scratch`, a fresh read-only `/proc`, and usable `/dev/{null,zero,random,urandom}`."""
    with open("/proc/self/uid_map") as handle:
        initial_user_namespace = handle.read().split() == ["0", "0", "4294967295"]
    if os.getpid() != 1 or initial_user_namespace:  # never remount the host's file system, whatever the caller did
        raise SandboxError(errno.EPERM, "isolate_filesystem outside a new user and PID namespace")
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing done here propagates back to the host
    _mount_setattr("/", _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV)
    _mount("tmpfs", scratch, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={scratch_bytes},mode=0700")
    _mount("tmpfs", "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={_SHM_BYTES},mode=1777")
    _mount("proc", "/proc", "proc", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    for device in _DEVICES:
        path = f"/dev/{device}"
        if os.path.exists(path):
            _mount(path, path, None, _MS_BIND)
            _mount_setattr(path, 0, _MOUNT_ATTR_NODEV, recursive=False)


def restrict_process(scratch: str, scratch_bytes: int, support: SandboxSupport) -> None:
    """rlimits, no_new_privs, Landlock (writes only under `scratch` and /dev/null), no capabilities, seccomp filter A.
    Inherited by every process the caller starts."""
    for limit, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_FSIZE, scratch_bytes),
                         (resource.RLIMIT_NOFILE, 1024)):  # fmt: skip
        hard = resource.getrlimit(limit)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(limit, (value, value))
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    if support.landlock_abi:
        _landlock_writes_only_under(scratch, "/dev/shm")
    _drop_capabilities()
    if support.seccomp:
        _load_filter_a()


def _landlock_writes_only_under(*folders: str) -> None:
    from landlock import FSAccess, Ruleset

    ruleset = Ruleset()  # handles every file-system right the kernel knows
    ruleset.allow("/", rules=FSAccess.EXECUTE | FSAccess.READ_FILE | FSAccess.READ_DIR)
    ruleset.allow(*folders)
    ruleset.allow("/dev/null", rules=FSAccess.READ_FILE | FSAccess.WRITE_FILE)
    ruleset.apply()


def _drop_capabilities() -> None:
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    _check(_libc.capset(ctypes.byref(header), ctypes.byref((_CapData * 2)())), "capset")


def _new_filter():
    import pyseccomp as seccomp

    return seccomp, seccomp.SyscallFilter(defaction=seccomp.ALLOW)


def _add_rule(seccomp, filter_, action: int, name: str, *args) -> None:
    try:
        filter_.add_rule(action, name, *args)
    except (OSError, ValueError, RuntimeError):  # a syscall this architecture or libseccomp does not have
        pass


def _load_filter_a() -> None:
    seccomp, filter_ = _new_filter()
    for name in _DENIED_SYSCALLS:
        _add_rule(seccomp, filter_, seccomp.ERRNO(errno.EPERM), name)
    for flag in (CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID,
                 CLONE_NEWNET, CLONE_NEWTIME):  # fmt: skip
        _add_rule(seccomp, filter_, seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    # clone3 passes its flags in memory a filter cannot read: ENOSYS makes libc fall back to clone.
    _add_rule(seccomp, filter_, seccomp.ERRNO(errno.ENOSYS), "clone3")
    filter_.load()


def confine_candidate(scratch: str) -> None:
    """For the process about to execute candidate code: a second Landlock layer (writes only under `scratch`, no
    longer /dev/shm) and seccomp filter B (no new processes or programs, threads stay allowed; signals only to
    itself). Each layer is skipped where the kernel or installation lacks it (the probe has recorded that)."""
    with contextlib.suppress(ImportError, OSError, Exception):  # LandlockError: no Landlock in this kernel
        _landlock_writes_only_under(scratch)
    try:
        seccomp, filter_ = _new_filter()
    except (ImportError, OSError):
        return
    denied = seccomp.ERRNO(errno.EPERM)
    for name in _NO_NEW_PROCESSES:
        _add_rule(seccomp, filter_, denied, name)
    _add_rule(seccomp, filter_, denied, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_THREAD, 0))
    own_pid = os.getpid()
    for name in _SIGNALS_TO_SELF_ONLY:
        _add_rule(seccomp, filter_, denied, name, seccomp.Arg(0, seccomp.NE, own_pid))
    filter_.load()


def _wait_with_deadline(pid: int, seconds: float, kill: Callable[[], None]) -> int:
    """Wait for child `pid` at most `seconds`, then `kill()` it; its exit status, or TIMED_OUT / KILLED."""
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], max(0.0, seconds))
    finally:
        os.close(pidfd)
    if not ready:
        kill()
    _, status = os.waitpid(pid, 0)  # with a PID namespace, returns once every process in it is gone
    if not ready:
        return TIMED_OUT
    if os.WIFSIGNALED(status):
        return KILLED
    return os.WEXITSTATUS(status)


def spawn_confined(
    run: Callable[[], int], scratch: str, wall_seconds: float, support: SandboxSupport, namespaces: bool,
    scratch_bytes: int = 64 << 20, report_fd: int | None = None,
) -> int:  # fmt: skip
    """Fork a supervisor that runs `run()` confined (see the module docstring) and exits with its status, or with
    SETUP_FAILED, TIMED_OUT or KILLED. Returns the supervisor's pid, for the caller to wait on (`os.pidfd_open`) and
    to kill as a backstop. `scratch` must be an existing empty directory; `report_fd`, if given, receives the reason
    when setup fails (it is closed before `run()` starts)."""
    pid = os.fork()
    if pid:
        return pid
    status = SETUP_FAILED
    try:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        keep = [report_fd] if report_fd is not None else []
        _quiet_descriptors_except(keep)
        if namespaces:
            enter_namespaces()
        child = os.fork()
        if child == 0:
            _run_confined(run, scratch, scratch_bytes, support, namespaces, report_fd)
        if namespaces:
            status = _wait_with_deadline(child, wall_seconds, lambda: os.kill(child, signal.SIGKILL))
        else:
            status = _wait_with_deadline(child, wall_seconds, lambda: _signal_group(child))
            _kill_group(child)  # whatever the run left in its session
    except BaseException as error:  # noqa: BLE001 - the supervisor must always exit
        _report(report_fd, f"sandbox supervisor: {error}")
    finally:
        os._exit(status)


def _run_confined(run: Callable[[], int], scratch: str, scratch_bytes: int, support: SandboxSupport,
                  namespaces: bool, report_fd: int | None) -> None:  # fmt: skip
    """The confined process (PID 1 of the new namespace, or a session leader): set up, then `run()`; never
    returns."""
    status = SETUP_FAILED
    try:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if namespaces:
            isolate_filesystem(scratch, scratch_bytes)
        else:
            os.setsid()
        os.chdir(scratch)
        restrict_process(scratch, scratch_bytes, support)
    except BaseException as error:  # noqa: BLE001
        _report(report_fd, f"sandbox setup: {error}")
        os._exit(SETUP_FAILED)
    if report_fd is not None:
        os.close(report_fd)
    try:
        status = run()
    except BaseException:  # noqa: BLE001 - an exception in the run is a status, never a traceback in the caller
        status = SETUP_FAILED
    finally:
        os._exit(status)


def _quiet_descriptors_except(keep: list[int]) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def _report(fd: int | None, message: str) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.write(fd, message.encode()[:4000])


def _signal_group(pgid: int, signum: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _kill_group(pgid: int, seconds: float = 2.0) -> None:
    """SIGKILL what is left of a process group whose leader was reaped, then wait (at most `seconds`) until its
    members are gone."""
    deadline = time.monotonic() + seconds
    try:
        os.killpg(pgid, signal.SIGKILL)
        while time.monotonic() < deadline:
            time.sleep(0.002)
            os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        pass


def wait_supervisor(pid: int) -> int:
    """Reap a supervisor started by `spawn_confined` (after its pidfd became readable, or after killing it)."""
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else KILLED


def probe_support(scratch: str) -> SandboxSupport:
    """Try each layer in a throwaway confined run (about 20 ms): namespaces with the mounts, Landlock, seccomp."""
    problems = []
    landlock_abi = _landlock_abi(problems)
    seccomp_ok = _seccomp_available(problems)
    partial = SandboxSupport(namespaces=True, landlock_abi=landlock_abi, seccomp=seccomp_ok)
    reason = _trial_run(scratch, partial, namespaces=True)
    if reason:
        problems.append(f"namespaces refused ({reason})")
        # The fallback still needs its own layers to work; drop any that fail there.
        partial = SandboxSupport(namespaces=False, landlock_abi=landlock_abi, seccomp=seccomp_ok)
        if _trial_run(scratch, partial, namespaces=False):
            problems.append("landlock and seccomp failed without namespaces")
            landlock_abi, seccomp_ok = 0, False
    return SandboxSupport(
        namespaces=not reason, landlock_abi=landlock_abi, seccomp=seccomp_ok, problems=tuple(problems)
    )


def _landlock_abi(problems: list[str]) -> int:
    try:
        from landlock import landlock_abi_version

        return int(landlock_abi_version())
    except ImportError:
        problems.append("the landlock package is not installed")
    except (OSError, Exception) as error:  # noqa: BLE001 - LandlockError: the kernel has no Landlock
        problems.append(f"landlock unavailable ({error})")
    return 0


def _seccomp_available(problems: list[str]) -> bool:
    try:
        import pyseccomp

        pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
        return True
    except ImportError:
        problems.append("the pyseccomp package is not installed")
    except Exception as error:  # noqa: BLE001 - libseccomp missing or too old
        problems.append(f"seccomp unavailable ({error})")
    return False


def _trial_run(scratch: str, support: SandboxSupport, namespaces: bool) -> str:
    """'' when a confined run with these layers starts and exits cleanly, else the reason."""
    read_fd, write_fd = os.pipe()
    try:
        pid = spawn_confined(lambda: 0, scratch, 30.0, support, namespaces, report_fd=write_fd)
        os.close(write_fd)
        write_fd = -1
        status = wait_supervisor(pid)
        with os.fdopen(read_fd, "rb") as handle:
            read_fd = -1
            reason = handle.read().decode(errors="replace").strip()
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
    if status == 0:
        return ""
    return reason or f"exit status {status}"
