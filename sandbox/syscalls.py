"""Calling the kernel from ctypes: libc loaded once, syscall(2) and prctl(2) with the
argument widths they read, and the per-arch syscall numbers seccomp and Landlock need.

Standard library only: this module runs inside the untrusted worker.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass

# --- libc and raw system calls ---------------------------------------------------------

# Loaded once at import, in the preloaded parent: forked workers inherit the mapping and
# pay nothing for it (NOTES: loading libseccomp in the child cost 18-46 ms).
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC_FUNCTIONS = {
    name: getattr(_LIBC, name)  # dlsym here, not in every child
    for name in ("syscall", "prctl", "unshare", "sethostname", "capset", "clearenv")
}


def libc_call(name: str, *args: object) -> int:
    result = int(_LIBC_FUNCTIONS[name](*args))
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return result


def syscall(number: int, *args: object) -> int:
    # syscall(2) is variadic and reads every argument as a long: pass longs and pointers,
    # never ctypes' default 32-bit int.
    return libc_call("syscall", ctypes.c_long(number), *args)


def prctl(option: int, *args: object) -> int:
    # prctl(2) is variadic too: unsigned longs (or pointers) for arg2..arg5.
    rest = [ctypes.c_ulong(0)] * (4 - len(args))
    return libc_call("prctl", ctypes.c_int(option), *args, *rest)


# prctl(2) options, <linux/prctl.h>.
PR_SET_DUMPABLE = 4
PR_GET_SECCOMP = 21
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39


@dataclass(frozen=True, slots=True)
class Arch:
    name: str
    audit_arch: int  # seccomp_data.arch, <linux/audit.h>: EM_* | __AUDIT_ARCH_64BIT | _LE
    index: int  # column in SYSCALLS
    x32_bit: int  # x86_64 runs x32 binaries with this bit set in the number (syscall(2))


ARCHES = {
    "x86_64": Arch("x86_64", 0xC000003E, 0, 0x40000000),  # AUDIT_ARCH_X86_64, EM_X86_64 62
    "aarch64": Arch("aarch64", 0xC00000B7, 1, 0),  # AUDIT_ARCH_AARCH64, EM_AARCH64 183
}

# (x86_64, aarch64) numbers: arch/x86/entry/syscalls/syscall_64.tbl and
# include/uapi/asm-generic/unistd.h; None where the arch has no such call. Numbers from 424
# up are shared by every arch. tests/test_confine.py checks them against the local headers.
SYSCALLS: Mapping[str, tuple[int | None, int | None]] = {
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


HOST_ARCH = ARCHES.get(os.uname().machine)


def syscall_number(name: str) -> int:
    number = None if HOST_ARCH is None else SYSCALLS[name][HOST_ARCH.index]
    if number is None:
        raise OSError(errno.ENOSYS, f"no {name} system call on {os.uname().machine}")
    return number
