"""Process confinement: the OS layers that must hold even when RestrictedPython is beaten.

`confine(plan)` applies the requested layers to THIS process, one way, in this order. Each
step needs something the earlier ones leave in place and must run before a later one takes
it away:

    close_fds      only the protocol fds and stderr survive; 0-2 become /dev/null otherwise
    no_new_privs   seccomp(2) and Landlock require it of an unprivileged caller
    namespaces     unshare(2) needs CAP_SYS_ADMIN (root) or a new user namespace
    private_cwd    mkdir + fchown to the drop user need root; Landlock needs the directory
    empty_env      os.environ, libc's environ, and the bytes /proc/PID/environ shows
    landlock       opens each allowed path as the caller (root can traverse 0700 parents);
    landlock_net     both in one ruleset: TCP bind/connect denied, signals and abstract
                     unix sockets scoped to the worker
    drop_user      after every step that needs privilege
    rlimits        after the drop, so RLIMIT_NPROC counts against the unprivileged uid
    seccomp        last: it forbids setuid and unshare, which the steps above use

Seccomp and Landlock bind only the calling thread, and unshare(CLONE_NEWUSER) refuses a
threaded process: `confine` refuses to run with more than one thread. Apply it in a forked
or freshly started child, never in a parent that forks more workers.

After Landlock only the paths Python needs stay readable (the prefixes, `sys.path`, this
package, and the tz database for the zoneinfo facade), and after the uid drop only what
`nobody` may read (an interpreter under /root is not): import everything a val may use before
confining. The workdir's parent must not be
writable by others (a planted directory is refused only when it is a symlink or not empty).
`probe()` checks every layer in a throwaway process so the caller stays unconfined.

The two big layers live in their own modules: the BPF filter in `sandbox.seccomp`, the
ruleset in `sandbox.landlock`; the raw calls both make in `sandbox.syscalls`, and the probe
and bench commands in `sandbox.confine_cli`.

Standard library only: this module runs inside the untrusted worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from sandbox.errors import SandboxError
from sandbox.landlock import apply_landlock
from sandbox.seccomp import install_seccomp
from sandbox.syscalls import PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, libc_call, prctl

NOBODY = 65534  # Debian's `nobody` and `nogroup`
MIB = 1024 * 1024

# Layer names as `[sandbox]` config and /healthz spell them.
LAYERS: tuple[str, ...] = (
    "rlimits",
    "no_new_privs",
    "seccomp",
    "landlock",
    "landlock_net",
    "namespaces",
    "drop_user",
    "close_fds",
    "empty_env",
    "private_cwd",
)
ALL_LAYERS = frozenset(LAYERS)
# seccomp(2): "the caller must have CAP_SYS_ADMIN ... or the thread must already have the
# no_new_privs bit set"; landlock_restrict_self(2) says the same. After the uid drop there is
# no CAP_SYS_ADMIN, so both always need the bit.
NEEDS_NO_NEW_PRIVS = frozenset({"seccomp", "landlock", "landlock_net"})


class ConfineError(SandboxError):
    """A requested layer could not be applied; the process must not run val code."""

    def __init__(self, layer: str | None, reason: str) -> None:
        what = f"confinement layer {layer!r} failed" if layer else "cannot confine"
        super().__init__(f"{what}: {reason}")
        self.layer = layer
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ConfinePlan:
    """What to apply. `workdir` must be absolute: it becomes the cwd and the only writable
    path. `keep_fds` survive close_fds (the protocol pipes and stderr). `read_paths` are
    extra read-only paths on top of what Python itself needs."""

    workdir: str
    keep_fds: tuple[int, ...] = (2,)
    memory_mb: int = 256
    cpu_time_s: int = 600  # hard limit over the worker's life; it may lower the soft one
    file_size_mb: int = 16
    open_files: int = 64
    drop_to_uid: int | None = NOBODY
    drop_to_gid: int | None = None  # None: the same number as the uid
    read_paths: tuple[str, ...] = ()
    layers: frozenset[str] = ALL_LAYERS

    def __post_init__(self) -> None:
        unknown = sorted(self.layers - ALL_LAYERS)
        if unknown:
            raise ValueError(f"unknown confinement layers {unknown}; known: {', '.join(LAYERS)}")
        if not os.path.isabs(self.workdir):
            raise ValueError(f"workdir must be an absolute path, not {self.workdir!r}")
        for name in ("memory_mb", "cpu_time_s", "file_size_mb", "open_files"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"{name} must be a positive int, not {value!r}")
        if not all(type(fd) is int and fd >= 0 for fd in self.keep_fds):
            raise ValueError(f"keep_fds must be non-negative ints: {self.keep_fds!r}")
        if self.layers & NEEDS_NO_NEW_PRIVS and "no_new_privs" not in self.layers:
            needing = sorted(self.layers & NEEDS_NO_NEW_PRIVS)
            raise ValueError(f"{needing} need the no_new_privs layer too")
        if "drop_user" in self.layers and self.drop_to_uid is None:
            raise ValueError("the drop_user layer needs drop_to_uid")


@dataclass(frozen=True, slots=True)
class LayerStatus:
    """One row of the table the service logs and shows on /healthz."""

    active: bool
    detail: str  # what is in force, or why the layer is not available here


# --- namespaces, identity, descriptors, environment ------------------------------------------

# clone(2) flags, <linux/sched.h>.
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
_HOSTNAME = b"valrun"


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522  # capget(2): two _CapData, 64 capability bits


def _unshare_namespaces() -> dict[str, str]:
    # An empty network namespace (not even loopback is up), a private System V IPC space,
    # and a hostname of our own so os.uname() does not name the host.
    flags = CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:
        libc_call("unshare", ctypes.c_int(flags))
        how = ""
    else:
        # user_namespaces(7): an unprivileged process may create these only together with
        # a user namespace, and must write "deny" to setgroups before it may map its gid.
        # A process that changed uid is not dumpable, and then proc(5) makes root own its
        # /proc/self files, maps included: become dumpable for the writes (drop_user
        # turns it off again).
        prctl(PR_SET_DUMPABLE, ctypes.c_ulong(1))
        libc_call("unshare", ctypes.c_int(flags | CLONE_NEWUSER))
        for name, text in (
            ("setgroups", "deny"),
            ("uid_map", f"{uid} {uid} 1"),
            ("gid_map", f"{gid} {gid} 1"),
        ):
            with open(f"/proc/self/{name}", "w") as file:
                file.write(text)
        how = f" in a new user namespace (uid {uid} mapped to itself)"
    libc_call("sethostname", ctypes.c_char_p(_HOSTNAME), ctypes.c_size_t(len(_HOSTNAME)))
    if uid != 0:
        # The creator holds every capability inside its new user namespace; give them up.
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        libc_call("capset", ctypes.byref(header), data)
    return {"namespaces": f"new net (no interfaces up), ipc, uts (hostname valrun){how}"}


def _close_inherited(keep_fds: tuple[int, ...]) -> dict[str, str]:
    # fork() copies every descriptor regardless of O_CLOEXEC (docs/design.md §2.6), so a
    # fork-server child holds its parent's listening sockets and database until they are
    # closed here.
    keep = set(keep_fds)
    devnull = os.open(os.devnull, os.O_RDWR)
    # 0-2 become /dev/null rather than closed: the next open() would otherwise get fd 0-2
    # and a stray print() would write into it.
    for fd in (0, 1, 2):
        if fd not in keep and fd != devnull:
            os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)
    low = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 2**31 - 1)  # close_range(2): one syscall, however many are open
    kept = ", ".join(str(fd) for fd in sorted(keep)) or "none"
    return {"close_fds": f"kept {kept}; 0-2 otherwise /dev/null; every other fd closed"}


def environ_span() -> tuple[int, int]:
    # proc_pid_stat(5): fields 50 and 51 are env_start and env_end, the stack bytes that
    # /proc/PID/environ shows. Field 2 (comm) may contain spaces and ')': split after it.
    with open("/proc/self/stat", "rb") as file:
        fields = file.read().rsplit(b")", 1)[1].split()
    return int(fields[50 - 3]), int(fields[51 - 3])


def _empty_environment() -> dict[str, str]:
    os.environ.clear()  # unsetenv() for each key
    libc_call("clearenv")  # and whatever Python did not mirror (entries without '=')
    # /proc/PID/environ reads the original strings from the process's own stack, which a
    # fork-server child shares with its parent's startup environment (docs/design.md §2.6):
    # zero them. libc's environ no longer points there; nothing else reads them after startup.
    start, end = environ_span()
    ctypes.memset(start, 0, end - start)
    return {"empty_env": f"os.environ and libc environ empty; {end - start} bytes zeroed"}


def _private_cwd(workdir: str, owner: tuple[int, int] | None) -> dict[str, str]:
    os.umask(0o077)  # whatever the val creates stays private too
    with contextlib.suppress(FileExistsError):  # the caller may have made it
        os.mkdir(workdir, 0o700)
    # O_NOFOLLOW: a symlink planted at the path must not redirect us (or the chown).
    fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.listdir(fd):
            raise OSError(errno.ENOTEMPTY, f"{workdir} is not empty")
        os.fchmod(fd, 0o700)
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchdir(fd)
        uid = os.fstat(fd).st_uid
    finally:
        os.close(fd)
    return {"private_cwd": f"empty 0700 workdir owned by uid {uid}, umask 077"}


def _drop_user(uid: int, gid: int) -> dict[str, str]:
    # Not dumpable: same-uid processes (other workers) cannot ptrace it or open its
    # /proc/PID/{mem,environ,fd} (proc(5), PR_SET_DUMPABLE in prctl(2)).
    if os.geteuid() != 0:
        prctl(PR_SET_DUMPABLE, ctypes.c_ulong(0))
        return {"drop_user": f"not root: already unprivileged (uid {os.geteuid()}); not dumpable"}
    # setgroups first (it needs CAP_SETGID), then gid, then uid: the reverse would leave
    # root's supplementary groups or gid behind (setuid(2), CERT POS36-C).
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    # The kernel already clears dumpable on a uid change when fs.suid_dumpable is 0.
    prctl(PR_SET_DUMPABLE, ctypes.c_ulong(0))
    try:  # CERT POS37-C: prove the drop cannot be undone
        os.setuid(0)
    except PermissionError:
        return {"drop_user": f"uid {uid}, gid {gid}, no supplementary groups, not dumpable"}
    raise OSError(errno.EPERM, "setuid(0) still succeeds after the drop")


def _set_rlimits(plan: ConfinePlan) -> dict[str, str]:
    limits = [
        (resource.RLIMIT_AS, plan.memory_mb * MIB),  # a 1 GiB bytearray is a MemoryError
        (resource.RLIMIT_CPU, plan.cpu_time_s),  # SIGXCPU, then SIGKILL: no Python runs
        (resource.RLIMIT_FSIZE, plan.file_size_mb * MIB),  # EFBIG: CPython ignores SIGXFSZ
        (resource.RLIMIT_NOFILE, plan.open_files),
        (resource.RLIMIT_CORE, 0),  # a core file would hold the val's memory
        (resource.RLIMIT_MEMLOCK, 0),
        (resource.RLIMIT_MSGQUEUE, 0),
    ]
    # setrlimit(2): RLIMIT_NPROC is not enforced for root (CAP_SYS_RESOURCE/CAP_SYS_ADMIN).
    if os.geteuid() != 0:
        limits.append((resource.RLIMIT_NPROC, 0))
    for which, value in limits:
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)  # only root may raise a hard limit
        resource.setrlimit(which, (value, value))
    nproc = ", NPROC 0" if os.geteuid() != 0 else " (NPROC is not enforced for root)"
    return {
        "rlimits": f"AS {plan.memory_mb} MiB, CPU {plan.cpu_time_s} s, FSIZE "
        f"{plan.file_size_mb} MiB, NOFILE {plan.open_files}, CORE/MEMLOCK/MSGQUEUE 0{nproc}"
    }


def _no_new_privs() -> dict[str, str]:
    prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1))
    return {"no_new_privs": "set: execve can never grant privileges again"}


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError as exc:
        raise ConfineError(None, f"cannot count this process's threads: {exc}") from exc


# --- the public entry points ---------------------------------------------------------------


def confine(plan: ConfinePlan, *, timings: dict[str, float] | None = None) -> dict[str, str]:
    """Apply `plan.layers` to this process, for good. Returns layer -> what is in force.

    Raises ConfineError naming the first layer that failed; the process is then partly
    confined and must exit without running val code. `timings`, when given, receives the
    seconds each step took.
    """
    if (threads := _thread_count()) != 1:
        raise ConfineError(
            None,
            f"this process runs {threads} threads; seccomp and Landlock bind only the calling "
            "thread: confine a single-threaded child",
        )
    root = os.geteuid() == 0
    dropping = root and "drop_user" in plan.layers and plan.drop_to_uid is not None
    uid = plan.drop_to_uid if plan.drop_to_uid is not None else os.geteuid()
    gid = plan.drop_to_gid if plan.drop_to_gid is not None else uid
    steps: list[tuple[str, bool, Callable[[], dict[str, str]]]] = [
        ("close_fds", "close_fds" in plan.layers, lambda: _close_inherited(plan.keep_fds)),
        ("no_new_privs", "no_new_privs" in plan.layers, _no_new_privs),
        ("namespaces", "namespaces" in plan.layers, _unshare_namespaces),
        (
            "private_cwd",
            "private_cwd" in plan.layers,
            lambda: _private_cwd(plan.workdir, (uid, gid) if dropping else None),
        ),
        ("empty_env", "empty_env" in plan.layers, _empty_environment),
        (
            "landlock",
            bool(plan.layers & {"landlock", "landlock_net"}),
            lambda: apply_landlock(
                plan.workdir,
                plan.read_paths,
                want_fs="landlock" in plan.layers,
                want_net="landlock_net" in plan.layers,
            ),
        ),
        ("drop_user", "drop_user" in plan.layers, lambda: _drop_user(uid, gid)),
        ("rlimits", "rlimits" in plan.layers, lambda: _set_rlimits(plan)),
        ("seccomp", "seccomp" in plan.layers, install_seccomp),
    ]
    applied: dict[str, str] = {}
    for step, wanted, apply in steps:
        if not wanted:
            continue
        started = time.perf_counter()
        try:
            applied.update(apply())
        except (OSError, ValueError) as exc:
            layer = step
            if step == "landlock" and "landlock" not in plan.layers:
                layer = "landlock_net"
            raise ConfineError(layer, str(exc)) from exc
        if timings is not None:
            timings[step] = time.perf_counter() - started
    return applied


def probe(*, drop_to_uid: int = NOBODY, timeout_s: float = 30.0) -> dict[str, LayerStatus]:
    """Which layers this machine supports, each proven by a real attempt.

    Runs `python -I -m sandbox.confine probe` with an empty environment: that process
    forks one throwaway child per layer, then one with all of them, so the caller is never
    confined and may have threads. Blocking (~0.1-0.3 s): call it before the event loop or
    from a worker thread.
    """
    # Imported here, in the front end that probes: subprocess imports threading, whose
    # after-fork hook would run (and copy ~0.4 MiB of the fork server's pages) in every worker
    # the fork server forks (docs/design.md §7.3).
    import subprocess

    command = [sys.executable, "-I", "-m", "sandbox.confine", "probe"]
    command += ["--drop-to-uid", str(drop_to_uid)]
    try:
        done = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env={},
            cwd="/",
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = f"the probe process failed: {exc}"
        return {layer: LayerStatus(False, reason) for layer in LAYERS}
    try:
        raw = json.loads(done.stdout)
    except ValueError:
        raw = None
    statuses = {}
    for layer in LAYERS:
        row = raw.get(layer) if isinstance(raw, dict) else None
        if isinstance(row, list) and len(row) == 2 and isinstance(row[1], str):
            statuses[layer] = LayerStatus(row[0] is True, row[1])
        else:
            tail = done.stderr.decode(errors="replace").strip()[-300:]
            statuses[layer] = LayerStatus(
                False, f"the probe (exit {done.returncode}) did not report it: {tail}"
            )
    return statuses


if __name__ == "__main__":
    # The CLI lives in sandbox.confine_cli; this stays the command probe() runs.
    from sandbox.confine_cli import main

    sys.exit(main())
