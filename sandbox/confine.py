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
package), and after the uid drop only what `nobody` may read (an interpreter under /root is
not): import everything a val may use before confining. The workdir's parent must not be
writable by others (a planted directory is refused only when it is a symlink or not empty).
`probe()` checks every layer in a throwaway process so the caller stays unconfined.

Standard library only: this module runs inside the untrusted worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import resource
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from sandbox.errors import SandboxError

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
_NEEDS_NO_NEW_PRIVS = frozenset({"seccomp", "landlock", "landlock_net"})


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
        if self.layers & _NEEDS_NO_NEW_PRIVS and "no_new_privs" not in self.layers:
            needing = sorted(self.layers & _NEEDS_NO_NEW_PRIVS)
            raise ValueError(f"{needing} need the no_new_privs layer too")
        if "drop_user" in self.layers and self.drop_to_uid is None:
            raise ValueError("the drop_user layer needs drop_to_uid")


@dataclass(frozen=True, slots=True)
class LayerStatus:
    """One row of the table the service logs and shows on /healthz."""

    active: bool
    detail: str  # what is in force, or why the layer is not available here


# --- libc and raw system calls ---------------------------------------------------------

# Loaded once at import, in the preloaded parent: forked workers inherit the mapping and
# pay nothing for it (NOTES: loading libseccomp in the child cost 18-46 ms).
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC_FUNCTIONS = {
    name: getattr(_LIBC, name)  # dlsym here, not in every child
    for name in ("syscall", "prctl", "unshare", "sethostname", "capset", "clearenv")
}


def _libc_call(name: str, *args: object) -> int:
    result = int(_LIBC_FUNCTIONS[name](*args))
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return result


def _syscall(number: int, *args: object) -> int:
    # syscall(2) is variadic and reads every argument as a long: pass longs and pointers,
    # never ctypes' default 32-bit int.
    return _libc_call("syscall", ctypes.c_long(number), *args)


def _prctl(option: int, *args: object) -> int:
    # prctl(2) is variadic too: unsigned longs (or pointers) for arg2..arg5.
    rest = [ctypes.c_ulong(0)] * (4 - len(args))
    return _libc_call("prctl", ctypes.c_int(option), *args, *rest)


# prctl(2) options, <linux/prctl.h>.
PR_SET_DUMPABLE = 4
PR_GET_SECCOMP = 21
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39


@dataclass(frozen=True, slots=True)
class _Arch:
    name: str
    audit_arch: int  # seccomp_data.arch, <linux/audit.h>: EM_* | __AUDIT_ARCH_64BIT | _LE
    index: int  # column in _SYSCALLS
    x32_bit: int  # x86_64 runs x32 binaries with this bit set in the number (syscall(2))


_ARCHES = {
    "x86_64": _Arch("x86_64", 0xC000003E, 0, 0x40000000),  # AUDIT_ARCH_X86_64, EM_X86_64 62
    "aarch64": _Arch("aarch64", 0xC00000B7, 1, 0),  # AUDIT_ARCH_AARCH64, EM_AARCH64 183
}

# (x86_64, aarch64) numbers: arch/x86/entry/syscalls/syscall_64.tbl and
# include/uapi/asm-generic/unistd.h; None where the arch has no such call. Numbers from 424
# up are shared by every arch. tests/test_confine.py checks them against the local headers.
_SYSCALLS: Mapping[str, tuple[int | None, int | None]] = {
    "ioctl": (16, 29),
    "socket": (41, 198),
    "connect": (42, 203),
    "accept": (43, 202),
    "bind": (49, 200),
    "listen": (50, 201),
    "socketpair": (53, 199),
    "clone": (56, 220),
    "fork": (57, None),
    "vfork": (58, None),
    "execve": (59, 221),
    "kill": (62, 129),
    "ptrace": (101, 117),
    "syslog": (103, 116),
    "setuid": (105, 146),
    "setgid": (106, 144),
    "setpgid": (109, 154),
    "setsid": (112, 157),
    "setreuid": (113, 145),
    "setregid": (114, 143),
    "setgroups": (116, 159),
    "setresuid": (117, 147),
    "setresgid": (119, 149),
    "setfsuid": (122, 151),
    "setfsgid": (123, 152),
    "capset": (126, 91),
    "rt_sigqueueinfo": (129, 138),
    "mknod": (133, None),
    "uselib": (134, None),
    "personality": (135, 92),
    "setpriority": (141, 140),
    "sched_setparam": (142, 118),
    "sched_setscheduler": (144, 119),
    "vhangup": (153, 58),
    "modify_ldt": (154, None),
    "pivot_root": (155, 41),
    "_sysctl": (156, None),
    "adjtimex": (159, 171),
    "chroot": (161, 51),
    "acct": (163, 89),
    "settimeofday": (164, 170),
    "mount": (165, 40),
    "umount2": (166, 39),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "reboot": (169, 142),
    "sethostname": (170, 161),
    "setdomainname": (171, 162),
    "iopl": (172, None),
    "ioperm": (173, None),
    "create_module": (174, None),
    "init_module": (175, 105),
    "delete_module": (176, 106),
    "get_kernel_syms": (177, None),
    "query_module": (178, None),
    "quotactl": (179, 60),
    "nfsservctl": (180, 42),
    "tkill": (200, 130),
    "sched_setaffinity": (203, 122),
    "lookup_dcookie": (212, 18),
    "clock_settime": (227, 112),
    "tgkill": (234, 131),
    "kexec_load": (246, 104),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "keyctl": (250, 219),
    "ioprio_set": (251, 30),
    "migrate_pages": (256, 238),
    "mknodat": (259, 33),
    "unshare": (272, 97),
    "move_pages": (279, 239),
    "accept4": (288, 242),
    "rt_tgsigqueueinfo": (297, 240),
    "perf_event_open": (298, 241),
    "fanotify_init": (300, 262),
    "prlimit64": (302, 261),
    "name_to_handle_at": (303, 264),
    "open_by_handle_at": (304, 265),
    "clock_adjtime": (305, 266),
    "setns": (308, 268),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "kcmp": (312, 272),
    "finit_module": (313, 273),
    "sched_setattr": (314, 274),
    "kexec_file_load": (320, 294),
    "bpf": (321, 280),
    "execveat": (322, 281),
    "userfaultfd": (323, 282),
    "pidfd_send_signal": (424, 424),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "open_tree": (428, 428),
    "move_mount": (429, 429),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "pidfd_open": (434, 434),
    "clone3": (435, 435),
    "pidfd_getfd": (438, 438),
    "process_madvise": (440, 440),
    "mount_setattr": (442, 442),
    "quotactl_fd": (443, 443),
    "landlock_create_ruleset": (444, 444),
    "landlock_add_rule": (445, 445),
    "landlock_restrict_self": (446, 446),
    "process_mrelease": (448, 448),
    "lsm_set_self_attr": (460, 460),
    "open_tree_attr": (467, 467),
}


_HOST_ARCH = _ARCHES.get(os.uname().machine)


def _nr(name: str) -> int:
    number = None if _HOST_ARCH is None else _SYSCALLS[name][_HOST_ARCH.index]
    if number is None:
        raise OSError(errno.ENOSYS, f"no {name} system call on {os.uname().machine}")
    return number


# --- the seccomp policy, as data ------------------------------------------------------------

# A denylist: CPython needs well over a hundred calls, and an allowlist breaks on the next
# libc. Everything here answers EPERM, so Python raises a clean PermissionError.
SECCOMP_DENY: tuple[str, ...] = (
    # Networking: no new sockets of any family. send/recv stay: they need a socket fd, and
    # close_fds leaves none but the protocol channel.
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    # New programs and processes. clone covers threads too: the worker runs none.
    "execve", "execveat", "fork", "vfork", "clone",
    # Reaching into other processes.
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_open", "pidfd_getfd",
    "pidfd_send_signal", "process_madvise", "process_mrelease", "rt_sigqueueinfo",
    "rt_tgsigqueueinfo", "migrate_pages", "move_pages", "ioprio_set",
    # Leaving the process group the front end kills (setpgid(2), setsid(2)).
    "setpgid", "setsid",
    # Mounts and namespaces.
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "open_tree",
    "open_tree_attr", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    # Identity: the drop to nobody is final; capset could only shrink, but nothing needs it.
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setfsuid",
    "setfsgid", "setgroups", "capset", "personality",
    # Kernel attack surface no val needs (the usual container-profile list).
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "open_by_handle_at",
    "name_to_handle_at", "fanotify_init", "lookup_dcookie", "uselib", "modify_ldt",
    "lsm_set_self_attr", "mknod", "mknodat", "vhangup", "nfsservctl", "_sysctl",
    # Machine administration.
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "create_module", "get_kernel_syms", "query_module", "reboot", "swapon", "swapoff",
    "syslog", "acct", "quotactl", "quotactl_fd", "iopl", "ioperm", "sethostname",
    "setdomainname", "settimeofday", "clock_settime", "adjtimex", "clock_adjtime",
)  # fmt: skip

# clone3 answers ENOSYS, not EPERM: glibc then falls back to clone (denied), as it does on
# kernels before 5.3, instead of treating EPERM as final (systemd's and Docker's choice).
SECCOMP_ENOSYS: tuple[str, ...] = ("clone3",)

_SELF = -1  # stands for the worker's own pid, known only in the child
# Allowed only when aimed at the worker itself: every (argument index, allowed low 32 bits)
# must match, or EPERM. pid_t and int arguments are 32 bits; the kernel ignores the rest.
# Same-uid processes (other workers running as nobody) are otherwise fair game for these.
SECCOMP_SELF_ONLY: Mapping[str, tuple[tuple[int, tuple[int, ...]], ...]] = {
    # abort() and signal.raise_signal() signal the caller itself (tgkill(getpid(), ...)).
    "kill": ((0, (_SELF,)),),
    "tkill": ((0, (_SELF,)),),
    "tgkill": ((0, (_SELF,)),),
    # setrlimit() is prlimit64(0, ...) in glibc; the worker re-arms its own RLIMIT_CPU.
    "prlimit64": ((0, (0, _SELF)),),
    # nice() is setpriority(PRIO_PROCESS=0, 0, ...); PRIO_USER would renice every worker.
    "setpriority": ((0, (0,)), (1, (0, _SELF))),
    "sched_setaffinity": ((0, (0, _SELF)),),
    "sched_setscheduler": ((0, (0, _SELF)),),
    "sched_setparam": ((0, (0, _SELF)),),
    "sched_setattr": ((0, (0, _SELF)),),
}
# ioctl(2) requests refused whatever the fd: TIOCSTI pushes input into a terminal (an
# inherited tty on stderr would run commands in the operator's shell; tty_ioctl(4)) and is
# still enabled where dev.tty.legacy_tiocsti=1, as here; TIOCLINUX has a similar paste mode.
SECCOMP_IOCTL_DENY: tuple[int, ...] = (0x5412, 0x541C)  # TIOCSTI, TIOCLINUX

# seccomp(2), <linux/seccomp.h> and <linux/filter.h>.
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
_BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_BPF_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_BPF_RET_K = 0x06  # BPF_RET | BPF_K
# struct seccomp_data { int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]; }
_OFFSET_NR, _OFFSET_ARCH, _OFFSET_ARGS = 0, 4, 16

_Insn = tuple[int, int, int, int]  # code, jt, jf, k


def _ret(value: int) -> _Insn:
    return (_BPF_RET_K, 0, 0, value)


def _load(offset: int) -> _Insn:
    return (_BPF_LD_W_ABS, 0, 0, offset)


def _jeq(value: int, jt: int, jf: int) -> _Insn:
    return (_BPF_JEQ_K, jt, jf, value & 0xFFFFFFFF)


def seccomp_program(arch_name: str, pid: int) -> list[_Insn]:
    """The filter as classic BPF instructions: arch check, then one block per syscall.

    Argument checks live inside their syscall's block, so for every other number the
    result depends on nothing but the number: the kernel's action cache (Linux 5.11)
    then skips the filter entirely for those (read, write, mmap ...).
    """
    arch = _ARCHES[arch_name]
    eperm = _ret(SECCOMP_RET_ERRNO | errno.EPERM)
    prog = [
        _load(_OFFSET_ARCH),
        # Another ABI (i386 through int 0x80 on x86_64) numbers syscalls differently, so
        # this table means nothing there: kill (seccomp(2), "Caveats").
        _jeq(arch.audit_arch, 1, 0),
        _ret(SECCOMP_RET_KILL_PROCESS),
        _load(_OFFSET_NR),
    ]
    if arch.x32_bit:
        prog += [(_BPF_JSET_K, 0, 1, arch.x32_bit), _ret(SECCOMP_RET_KILL_PROCESS)]

    def number(name: str) -> int | None:
        return _SYSCALLS[name][arch.index]

    for name in SECCOMP_DENY:
        if (nr := number(name)) is not None:
            prog += [_jeq(nr, 0, 1), eperm]
    for name in SECCOMP_ENOSYS:
        if (nr := number(name)) is not None:
            prog += [_jeq(nr, 0, 1), _ret(SECCOMP_RET_ERRNO | errno.ENOSYS)]
    for name, conditions in SECCOMP_SELF_ONLY.items():
        if (nr := number(name)) is None:
            continue
        block: list[_Insn] = []
        for index, allowed in conditions:
            values = [pid if v == _SELF else v for v in allowed]
            block.append(_load(_OFFSET_ARGS + 8 * index))  # low word: little-endian
            # A match jumps over the remaining compares and the EPERM to the next check.
            block += [_jeq(v, len(values) - i, 0) for i, v in enumerate(values)]
            block.append(eperm)
        block.append(_ret(SECCOMP_RET_ALLOW))
        prog += [_jeq(nr, 0, len(block)), *block]
    if (nr := number("ioctl")) is not None:
        deny = SECCOMP_IOCTL_DENY
        block = [_load(_OFFSET_ARGS + 8 * 1)]
        block += [_jeq(v, len(deny) - i, 0) for i, v in enumerate(deny)]
        block += [_ret(SECCOMP_RET_ALLOW), eperm]
        prog += [_jeq(nr, 0, len(block)), *block]
    prog.append(_ret(SECCOMP_RET_ALLOW))
    return prog


# struct sock_filter { __u16 code; __u8 jt; __u8 jf; __u32 k; }, <linux/filter.h>
_SOCK_FILTER = struct.Struct("=HBBI")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _pack_program(arch_name: str) -> tuple[bytes, tuple[int, ...]]:
    """The filter as struct sock_filter[], built for pid _SELF, and the byte offsets of
    the compares that must hold the real pid."""
    prog = seccomp_program(arch_name, _SELF)
    placeholder = _SELF & 0xFFFFFFFF  # no pid and no policy value is 2**32 - 1
    offsets = tuple(
        index * _SOCK_FILTER.size + 4
        for index, (code, _, _, k) in enumerate(prog)
        if code == _BPF_JEQ_K and k == placeholder
    )
    return b"".join(_SOCK_FILTER.pack(*insn) for insn in prog), offsets


# Packed once at import, in the preloaded parent: building the program in each child was
# two thirds of seccomp's cost there. A child only writes its pid into the compares.
_PACKED_PROGRAM = _pack_program(_HOST_ARCH.name) if _HOST_ARCH else None


def _install_seccomp() -> dict[str, str]:
    if _HOST_ARCH is None or _PACKED_PROGRAM is None:
        raise OSError(errno.ENOTSUP, f"no syscall table for {os.uname().machine}")
    packed, pid_offsets = _PACKED_PROGRAM
    program = ctypes.create_string_buffer(packed, len(packed))
    for offset in pid_offsets:
        struct.pack_into("=I", program, offset, os.getpid())
    fprog = _SockFprog(len(packed) // _SOCK_FILTER.size, ctypes.addressof(program))
    _prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog))
    denied = sum(1 for name in SECCOMP_DENY if _SYSCALLS[name][_HOST_ARCH.index] is not None)
    return {
        "seccomp": f"{_HOST_ARCH.name} BPF, {len(packed) // _SOCK_FILTER.size} insns: "
        f"{denied} syscalls EPERM, clone3 ENOSYS, signals/prlimit/sched/setpriority "
        "self-only, TIOCSTI refused, other ABIs killed"
    }


# --- Landlock ---------------------------------------------------------------------------------

# landlock(7), <linux/landlock.h>. Filesystem rights; the ABI that added each.
LL_FS_EXECUTE = 1 << 0
LL_FS_WRITE_FILE = 1 << 1
LL_FS_READ_FILE = 1 << 2
LL_FS_READ_DIR = 1 << 3
LL_FS_REMOVE_DIR = 1 << 4
LL_FS_REMOVE_FILE = 1 << 5
LL_FS_MAKE_CHAR = 1 << 6
LL_FS_MAKE_DIR = 1 << 7
LL_FS_MAKE_REG = 1 << 8
LL_FS_MAKE_SOCK = 1 << 9
LL_FS_MAKE_FIFO = 1 << 10
LL_FS_MAKE_BLOCK = 1 << 11
LL_FS_MAKE_SYM = 1 << 12
LL_FS_REFER = 1 << 13  # ABI 2
LL_FS_TRUNCATE = 1 << 14  # ABI 3
LL_FS_IOCTL_DEV = 1 << 15  # ABI 5
LL_NET_BIND_TCP = 1 << 0  # ABI 4
LL_NET_CONNECT_TCP = 1 << 1  # ABI 4
LL_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
LL_SCOPE_SIGNAL = 1 << 1  # ABI 6
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1
_LL_KNOWN_ABI = 7  # the newest ABI these tables describe (Linux 6.15)
# Rights a rule on a non-directory may carry; anything else is EINVAL (landlock_add_rule(2)).
_LL_FILE_RIGHTS = (
    LL_FS_EXECUTE | LL_FS_WRITE_FILE | LL_FS_READ_FILE | LL_FS_TRUNCATE | LL_FS_IOCTL_DEV
)
# No EXECUTE anywhere: it governs execve(2) only, while imports of C extensions mmap with
# PROT_EXEC under READ_FILE.
_LL_READ = LL_FS_READ_FILE | LL_FS_READ_DIR
# The private directory: files and subdirectories, renames within it (REFER), truncation.
# No device nodes, sockets, fifos or symlinks: nothing a val needs, and each is a door.
_LL_WORKDIR = (
    _LL_READ
    | LL_FS_WRITE_FILE
    | LL_FS_REMOVE_DIR
    | LL_FS_REMOVE_FILE
    | LL_FS_MAKE_DIR
    | LL_FS_MAKE_REG
    | LL_FS_REFER
    | LL_FS_TRUNCATE
)
# open("/dev/null", "w") truncates, which needs TRUNCATE once it is handled.
_LL_DEV_NULL = LL_FS_READ_FILE | LL_FS_WRITE_FILE | LL_FS_TRUNCATE


class _RulesetAttr(ctypes.Structure):
    # The kernel accepts a longer struct when the tail is zero (copy_struct_from_user), so
    # one layout serves every ABI as long as the newer fields stay 0 on older kernels.
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),  # ABI 4
        ("scoped", ctypes.c_uint64),  # ABI 6
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in the uapi header: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The Landlock ABI version of this kernel; 0 when Landlock is missing or disabled."""
    try:
        return _syscall(
            _nr("landlock_create_ruleset"),
            ctypes.c_void_p(None),
            ctypes.c_size_t(0),
            ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION),
        )
    except OSError:  # ENOSYS (not built), EOPNOTSUPP (disabled at boot)
        return 0


def _landlock_fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1  # ABI 1: EXECUTE .. MAKE_SYM
    if abi >= 2:
        rights |= LL_FS_REFER
    if abi >= 3:
        rights |= LL_FS_TRUNCATE
    if abi >= 5:
        rights |= LL_FS_IOCTL_DEV
    return rights


_PACKAGE_DIR = str(Path(__file__).resolve().parent)


def python_read_paths() -> tuple[str, ...]:
    """What the interpreter reads after start: its prefixes, every absolute `sys.path`
    entry that exists, and this package's own directory (an editable install keeps it
    outside site-packages). Only the package directory, not the repository holding it:
    that holds the database and configuration."""
    candidates = [
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        *sys.path,  # '' and relative entries mean the cwd: the workdir rule covers it
        _PACKAGE_DIR,
    ]
    return tuple(dict.fromkeys(p for p in candidates if os.path.isabs(p) and os.path.exists(p)))


def _add_path_rule(ruleset_fd: int, path: str, access: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= _LL_FILE_RIGHTS
        rule = _PathBeneathAttr(access, fd)
        _syscall(
            _nr("landlock_add_rule"),
            ctypes.c_long(ruleset_fd),
            ctypes.c_long(LANDLOCK_RULE_PATH_BENEATH),
            ctypes.byref(rule),
            ctypes.c_long(0),
        )
    finally:
        os.close(fd)


def _apply_landlock(plan: ConfinePlan) -> dict[str, str]:
    want_fs, want_net = "landlock" in plan.layers, "landlock_net" in plan.layers
    abi = landlock_abi()
    if abi < 1:
        raise OSError(errno.ENOTSUP, "Landlock is not enabled in this kernel (lsm= boot list)")
    if want_net and abi < 4:
        raise OSError(errno.ENOTSUP, f"Landlock ABI {abi} has no TCP rules (needs 4, Linux 6.7)")
    fs = _landlock_fs_rights(abi) if want_fs else 0
    # Handled with no rule at all: every TCP bind and connect is denied, any port.
    net = LL_NET_BIND_TCP | LL_NET_CONNECT_TCP if want_net else 0
    # Scoping: no signals to processes outside this domain (the front end, other workers)
    # and no connecting to abstract unix sockets bound outside it (D-Bus, containerd ...).
    scoped = LL_SCOPE_ABSTRACT_UNIX_SOCKET | LL_SCOPE_SIGNAL if want_fs and abi >= 6 else 0
    attr = _RulesetAttr(fs, net, scoped)
    ruleset_fd = _syscall(
        _nr("landlock_create_ruleset"),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
        ctypes.c_uint32(0),
    )
    try:
        read_paths = (*python_read_paths(), *plan.read_paths)
        if want_fs:
            for path in read_paths:
                _add_path_rule(ruleset_fd, path, _LL_READ & fs)
            _add_path_rule(ruleset_fd, "/dev/null", _LL_DEV_NULL & fs)
            _add_path_rule(ruleset_fd, "/dev/urandom", LL_FS_READ_FILE)
            _add_path_rule(ruleset_fd, plan.workdir, _LL_WORKDIR & fs)
        _syscall(_nr("landlock_restrict_self"), ctypes.c_long(ruleset_fd), ctypes.c_long(0))
    finally:
        os.close(ruleset_fd)
    newer = f" (rules for ABI <= {_LL_KNOWN_ABI})" if abi > _LL_KNOWN_ABI else ""
    applied = {}
    if want_fs:
        scope = "signals and abstract unix sockets scoped" if scoped else "no scoping (ABI < 6)"
        applied["landlock"] = (
            f"ABI {abi}{newer}: read-only {len(read_paths)} paths + /dev/null, /dev/urandom; "
            f"read-write the workdir; {scope}"
        )
    if want_net:
        applied["landlock_net"] = f"ABI {abi}: TCP bind and connect denied on every port"
    return applied


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
        _libc_call("unshare", ctypes.c_int(flags))
        how = ""
    else:
        # user_namespaces(7): an unprivileged process may create these only together with
        # a user namespace, and must write "deny" to setgroups before it may map its gid.
        # A process that changed uid is not dumpable, and then proc(5) makes root own its
        # /proc/self files, maps included: become dumpable for the writes (drop_user
        # turns it off again).
        _prctl(PR_SET_DUMPABLE, ctypes.c_ulong(1))
        _libc_call("unshare", ctypes.c_int(flags | CLONE_NEWUSER))
        for name, text in (
            ("setgroups", "deny"),
            ("uid_map", f"{uid} {uid} 1"),
            ("gid_map", f"{gid} {gid} 1"),
        ):
            with open(f"/proc/self/{name}", "w") as file:
                file.write(text)
        how = f" in a new user namespace (uid {uid} mapped to itself)"
    _libc_call("sethostname", ctypes.c_char_p(_HOSTNAME), ctypes.c_size_t(len(_HOSTNAME)))
    if uid != 0:
        # The creator holds every capability inside its new user namespace; give them up.
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        _libc_call("capset", ctypes.byref(header), data)
    return {"namespaces": f"new net (no interfaces up), ipc, uts (hostname valrun){how}"}


def _close_inherited(keep_fds: tuple[int, ...]) -> dict[str, str]:
    # fork() copies every descriptor regardless of O_CLOEXEC (NOTES), so a fork-server child
    # holds its parent's listening sockets and database until they are closed here.
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


def _environ_span() -> tuple[int, int]:
    # proc_pid_stat(5): fields 50 and 51 are env_start and env_end, the stack bytes that
    # /proc/PID/environ shows. Field 2 (comm) may contain spaces and ')': split after it.
    with open("/proc/self/stat", "rb") as file:
        fields = file.read().rsplit(b")", 1)[1].split()
    return int(fields[50 - 3]), int(fields[51 - 3])


def _empty_environment() -> dict[str, str]:
    os.environ.clear()  # unsetenv() for each key
    _libc_call("clearenv")  # and whatever Python did not mirror (entries without '=')
    # /proc/PID/environ reads the original strings from the process's own stack, which a
    # fork-server child shares with its parent's startup environment (NOTES): zero them.
    # libc's environ no longer points there; nothing else reads them after startup.
    start, end = _environ_span()
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
        _prctl(PR_SET_DUMPABLE, ctypes.c_ulong(0))
        return {"drop_user": f"not root: already unprivileged (uid {os.geteuid()}); not dumpable"}
    # setgroups first (it needs CAP_SETGID), then gid, then uid: the reverse would leave
    # root's supplementary groups or gid behind (setuid(2), CERT POS36-C).
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    # The kernel already clears dumpable on a uid change when fs.suid_dumpable is 0.
    _prctl(PR_SET_DUMPABLE, ctypes.c_ulong(0))
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
    _prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1))
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
            lambda: _apply_landlock(plan),
        ),
        ("drop_user", "drop_user" in plan.layers, lambda: _drop_user(uid, gid)),
        ("rlimits", "rlimits" in plan.layers, lambda: _set_rlimits(plan)),
        ("seccomp", "seccomp" in plan.layers, _install_seccomp),
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


# --- what runs in the probe process ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ProbeContext:
    root: str  # a private temporary directory; workdirs and the marker live in it
    marker: str  # a file outside every workdir: readable unconfined, not under Landlock
    stray_fd: int  # an inherited fd close_fds must close
    netns_inode: int
    was_root: bool
    drop_to_uid: int


def _expect_denied(attempt: Callable[[], object], what: str) -> str | None:
    try:
        attempt()
    except PermissionError:
        return None
    except OSError as exc:
        return f"{what} failed, but not for lack of permission: {exc}"
    return f"{what} still works"


def _connect_tcp() -> None:
    # Port 1 need not listen: Landlock refuses with EACCES before TCP answers ECONNREFUSED.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.connect(("127.0.0.1", 1))


def _read_file(path: str) -> None:
    with open(path, "rb") as file:
        file.read()


def _check(
    layer: str, ctx: _ProbeContext, plan: ConfinePlan, env_span: tuple[int, int]
) -> str | None:
    """None when the layer is demonstrably in force in this process, else what is wrong."""
    if layer == "rlimits":
        ok = resource.getrlimit(resource.RLIMIT_AS)[0] == plan.memory_mb * MIB
        return None if ok else "RLIMIT_AS is not set"
    if layer == "no_new_privs":
        return None if _prctl(PR_GET_NO_NEW_PRIVS) == 1 else "the bit is not set"
    if layer == "seccomp":
        if _prctl(PR_GET_SECCOMP) != SECCOMP_MODE_FILTER:
            return "no filter installed"
        return _expect_denied(lambda: socket.socket().close(), "socket()")
    if layer == "landlock":
        return _expect_denied(lambda: _read_file(ctx.marker), "reading a file outside")
    if layer == "landlock_net":
        return _expect_denied(_connect_tcp, "TCP connect")
    if layer == "namespaces":
        same = os.stat("/proc/self/ns/net").st_ino == ctx.netns_inode
        return "still in the parent's network namespace" if same else None
    if layer == "drop_user":
        if ctx.was_root and os.getuid() != ctx.drop_to_uid:
            return f"still uid {os.getuid()}"
        return None
    if layer == "close_fds":
        try:
            os.fstat(ctx.stray_fd)
        except OSError:
            return None
        return f"inherited fd {ctx.stray_fd} is still open"
    if layer == "empty_env":
        start, end = env_span
        if os.environ or ctypes.string_at(start, end - start).strip(b"\0"):
            return "the environment is still visible"
        return None
    if layer == "private_cwd":
        mode = stat.S_IMODE(os.stat(".").st_mode)
        if os.getcwd() != plan.workdir or mode != 0o700:
            return f"cwd {os.getcwd()} mode {mode:o}"
        return None
    raise ValueError(layer)


def _in_child(body: Callable[[int], dict[str, object]]) -> dict[str, object]:
    """Run body(report_fd) in a forked child; return the JSON object it reports."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into the caller's code
        try:
            os.close(read_fd)
            report = body(write_fd)
        except BaseException as exc:
            report = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            data = json.dumps(report).encode()
            while data:
                data = data[os.write(write_fd, data) :]
        finally:
            os._exit(0)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        if os.WIFSIGNALED(status):
            return {"error": f"the child was killed by signal {os.WTERMSIG(status)}"}
        return {"error": f"the child exited ({os.waitstatus_to_exitcode(status)}) silently"}
    report = json.loads(b"".join(chunks))
    return report if isinstance(report, dict) else {"error": "the child sent a bad report"}


def _try_layers(ctx: _ProbeContext, name: str, layers: frozenset[str]) -> dict[str, object]:
    """Confine a child with `layers` (and what they need), then check each one."""
    workdir = os.path.join(ctx.root, f"work-{name}")
    os.mkdir(workdir, 0o700)
    if layers & _NEEDS_NO_NEW_PRIVS:
        layers |= {"no_new_privs"}
    plan = ConfinePlan(workdir=workdir, drop_to_uid=ctx.drop_to_uid, layers=layers)

    def body(report_fd: int) -> dict[str, object]:
        env_span = _environ_span()
        try:
            applied = confine(replace(plan, keep_fds=(2, report_fd)))
        except ConfineError as exc:
            return {"failed": exc.layer, "reason": exc.reason}
        problems = {layer: _check(layer, ctx, plan, env_span) for layer in layers}
        return {"applied": applied, "problems": problems}

    return _in_child(body)


def _verdict(layer: str, report: Mapping[str, object], *, alone: bool) -> tuple[bool, str]:
    context = "" if alone else "works alone, but not after the other layers: "
    if "error" in report:
        return False, f"{context}{report['error']}"
    if "failed" in report:
        if alone or report["failed"] in (layer, None):
            return False, f"{context}{report['reason']}"
        return True, "(not reached: an earlier layer failed)"
    problems, applied = report.get("problems"), report.get("applied")
    if not isinstance(problems, dict) or not isinstance(applied, dict):
        return False, f"{context}the child sent a bad report"
    if problem := problems.get(layer):
        return False, f"{context}applied, but {problem}"
    return True, str(applied.get(layer))


def _probe_here(drop_to_uid: int) -> dict[str, tuple[bool, str]]:
    root = tempfile.mkdtemp(prefix="valrun-probe-")
    try:
        marker = os.path.join(root, "outside")
        with open(marker, "w") as file:
            file.write("outside every workdir\n")
        ctx = _ProbeContext(
            root=root,
            marker=marker,
            stray_fd=os.open(marker, os.O_RDONLY),  # inherited by fork, like any fd
            netns_inode=os.stat("/proc/self/ns/net").st_ino,
            was_root=os.geteuid() == 0,
            drop_to_uid=drop_to_uid,
        )
        results = {
            layer: _verdict(layer, _try_layers(ctx, layer, frozenset({layer})), alone=True)
            for layer in LAYERS
        }
        # Then together, in the real order: a layer may work alone and fail after another
        # one (Landlock paths after the uid drop, unshare after seccomp).
        working = frozenset(layer for layer, (ok, _) in results.items() if ok)
        report = _try_layers(ctx, "all", working)
        for layer in working:
            ok, detail = _verdict(layer, report, alone=False)
            if not ok:
                results[layer] = (False, detail)
        return results
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _bench(children: int) -> dict[str, float]:
    """Median milliseconds per step of a full confine() in forked children."""
    import statistics  # the CLI's alone: workers need not load it

    samples: dict[str, list[float]] = {}
    root = tempfile.mkdtemp(prefix="valrun-bench-")
    try:
        for index in range(children):
            workdir = os.path.join(root, f"w{index}")

            def body(report_fd: int, workdir: str = workdir) -> dict[str, object]:
                timings: dict[str, float] = {}
                confine(ConfinePlan(workdir=workdir, keep_fds=(2, report_fd)), timings=timings)
                return {"timings": timings}

            report = _in_child(body)
            timings = report.get("timings")
            if not isinstance(timings, dict):
                raise RuntimeError(f"bench child failed: {report}")
            for step, seconds in timings.items():
                samples.setdefault(step, []).append(seconds * 1000)
            samples.setdefault("total", []).append(sum(timings.values()) * 1000)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {step: statistics.median(values) for step, values in samples.items()}


def main(argv: list[str] | None = None) -> int:
    import argparse  # the CLI's alone: workers need not load it

    parser = argparse.ArgumentParser(prog="python -I -m sandbox.confine")
    commands = parser.add_subparsers(dest="command", required=True)
    probe_parser = commands.add_parser("probe", help="print each layer's status as JSON")
    probe_parser.add_argument("--drop-to-uid", type=int, default=NOBODY)
    bench_parser = commands.add_parser("bench", help="median cost per layer in forked children")
    bench_parser.add_argument("-n", "--children", type=int, default=200)
    args = parser.parse_args(argv)
    if args.command == "probe":
        print(json.dumps(_probe_here(args.drop_to_uid)))
        return 0
    medians = _bench(args.children)
    print(f"median over {args.children} forked children, full plan, uid {os.geteuid()}:")
    for step, millis in medians.items():
        print(f"  {step:<13} {millis:8.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
