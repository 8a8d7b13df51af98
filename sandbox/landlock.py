"""The Landlock layers: one ruleset for files, TCP and scoping, through raw syscalls.

Standard library only: this module runs inside the untrusted worker.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import sys
import zoneinfo
from pathlib import Path

from sandbox.syscalls import syscall, syscall_number

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
        return syscall(
            syscall_number("landlock_create_ruleset"),
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
    entry that exists, the tz database, and this package's own directory (an editable
    install keeps it outside site-packages). Only the package directory, not the repository
    holding it: that holds the database and configuration."""
    candidates = [
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        *sys.path,  # '' and relative entries mean the cwd: the workdir rule covers it
        _PACKAGE_DIR,
        # The system's tz database, for the zoneinfo facade: public data, read on demand
        # (ZoneInfo(key) opens the zone's file). Only the directories that exist.
        *zoneinfo.TZPATH,
    ]
    return tuple(dict.fromkeys(p for p in candidates if os.path.isabs(p) and os.path.exists(p)))


def _add_path_rule(ruleset_fd: int, path: str, access: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= _LL_FILE_RIGHTS
        rule = _PathBeneathAttr(access, fd)
        syscall(
            syscall_number("landlock_add_rule"),
            ctypes.c_long(ruleset_fd),
            ctypes.c_long(LANDLOCK_RULE_PATH_BENEATH),
            ctypes.byref(rule),
            ctypes.c_long(0),
        )
    finally:
        os.close(fd)


def apply_landlock(
    workdir: str, extra_read_paths: tuple[str, ...], *, want_fs: bool, want_net: bool
) -> dict[str, str]:
    """One ruleset for the `landlock` layer (`want_fs`) and `landlock_net` (`want_net`),
    applied to this process. Returns layer -> what is in force."""
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
    ruleset_fd = syscall(
        syscall_number("landlock_create_ruleset"),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
        ctypes.c_uint32(0),
    )
    try:
        read_paths = (*python_read_paths(), *extra_read_paths)
        if want_fs:
            for path in read_paths:
                _add_path_rule(ruleset_fd, path, _LL_READ & fs)
            _add_path_rule(ruleset_fd, "/dev/null", _LL_DEV_NULL & fs)
            _add_path_rule(ruleset_fd, "/dev/urandom", LL_FS_READ_FILE)
            _add_path_rule(ruleset_fd, workdir, _LL_WORKDIR & fs)
        syscall(
            syscall_number("landlock_restrict_self"), ctypes.c_long(ruleset_fd), ctypes.c_long(0)
        )
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
