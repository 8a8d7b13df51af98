"""The seccomp layer: a hand-written classic BPF filter, kept as data, built per arch.

The program is packed once at import (in the preloaded parent); a confined child only
writes its pid into the self-only compares and installs it with prctl(2).

Standard library only: this module runs inside the untrusted worker.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Mapping

from sandbox.syscalls import ARCHES, HOST_ARCH, PR_SET_SECCOMP, SYSCALLS, prctl

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
    arch = ARCHES[arch_name]
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
        return SYSCALLS[name][arch.index]

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
_PACKED_PROGRAM = _pack_program(HOST_ARCH.name) if HOST_ARCH else None


def install_seccomp() -> dict[str, str]:
    if HOST_ARCH is None or _PACKED_PROGRAM is None:
        raise OSError(errno.ENOTSUP, f"no syscall table for {os.uname().machine}")
    packed, pid_offsets = _PACKED_PROGRAM
    program = ctypes.create_string_buffer(packed, len(packed))
    for offset in pid_offsets:
        struct.pack_into("=I", program, offset, os.getpid())
    fprog = _SockFprog(len(packed) // _SOCK_FILTER.size, ctypes.addressof(program))
    prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog))
    denied = sum(1 for name in SECCOMP_DENY if SYSCALLS[name][HOST_ARCH.index] is not None)
    return {
        "seccomp": f"{HOST_ARCH.name} BPF, {len(packed) // _SOCK_FILTER.size} insns: "
        f"{denied} syscalls EPERM, clone3 ENOSYS, signals/prlimit/sched/setpriority "
        "self-only, TIOCSTI refused, other ABIs killed"
    }
