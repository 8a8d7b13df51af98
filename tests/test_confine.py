"""Each confinement layer, proven by a real attack from a really confined process.

DRIVER runs as `python -I -c DRIVER SPEC`: it confines itself with `sandbox.confine` and
then runs the attack with plain `exec`, no RestrictedPython (issue 4, item 5: the process
layers hold alone). Every attack also runs unconfined, as the positive control: it must
succeed there, or the confined refusal would prove nothing. Where an attack can leave a
trace outside the process (a TCP connection, a signal, a file) the test looks for that too.

Nothing here confines the pytest process itself: `confine` is only ever called in a child.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sandbox.confine import ALL_LAYERS, LAYERS, NOBODY, ConfinePlan, probe
from sandbox.landlock import landlock_abi
from sandbox.seccomp import seccomp_program
from sandbox.syscalls import SYSCALLS
from tests.confine_kit import (
    IS_ROOT,
    REPO,
    SECRET,
    assert_done,
    assert_refused,
    driver_command,
    new_workdir,
    next_tag,
    run_driver,
)

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or landlock_abi() < 6 or not IS_ROOT,
    reason="needs Linux with Landlock ABI >= 6, run as root (the machines valrun targets)",
)


@dataclass
class Targets:
    """What attacks aim at, outside the attacking process."""

    tcp: socket.socket
    abstract: socket.socket
    abstract_name: str
    victim: subprocess.Popen[bytes]
    signals: list[int]
    outside: list[Path] = field(default_factory=list)

    def context(self) -> dict[str, Any]:
        return {
            "parent": os.getpid(),
            "port": self.tcp.getsockname()[1],
            "abstract": self.abstract_name,
            "victim": self.victim.pid,
            "tmp_file": str(self.outside[0]),
            "repo_file": str(self.outside[1]),
            "package_file": str(self.outside[2]),
        }


def _accepted(listener: socket.socket) -> bool:
    listener.setblocking(False)
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


@pytest.fixture
def targets() -> Iterator[Targets]:
    tcp = socket.create_server(("127.0.0.1", 0))
    abstract_name = f"\0valrun-confine-test-{os.getpid()}"
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind(abstract_name)
    abstract.listen()
    victim = subprocess.Popen(["sleep", "60"])  # another process, as another worker would be
    received: list[int] = []
    old = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    tag = f"valrun-confine-{os.getpid()}-{next_tag()}"
    outside = [Path("/tmp") / tag, REPO / f".{tag}", REPO / "sandbox" / f".{tag}"]
    try:
        yield Targets(tcp, abstract, abstract_name, victim, received, outside)
    finally:
        signal.signal(signal.SIGUSR1, old)
        victim.kill()
        victim.wait()
        tcp.close()
        abstract.close()
        for path in outside:
            path.unlink(missing_ok=True)


# --- every layer on: plain Python cannot get out ----------------------------------------------

LIBC_CALL = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
def check(ret):
    if ret == -1:
        raise OSError(ctypes.get_errno(), 'libc')
    return ret
"""


@dataclass(frozen=True)
class Attack:
    code: str
    refusal: str  # the exception type a confined process gets
    trace: Callable[[Targets], bool] | None = None  # did it reach its target?
    control: bool = True  # also run it unconfined, expecting success


ATTACKS: dict[str, Attack] = {
    "read_etc_passwd": Attack("result = open('/etc/passwd').read()", "PermissionError"),
    "read_etc_hostname": Attack("result = open('/etc/hostname').read()", "PermissionError"),
    # No unconfined control: PID 1 belongs to the machine, not to this test (its environ
    # is not ours to read). read_parent_environ's control proves the same path works.
    "read_pid1_environ": Attack(
        "result = len(open('/proc/1/environ', 'rb').read())", "PermissionError", control=False
    ),
    "read_parent_environ": Attack(
        "result = len(open(f\"/proc/{ctx['parent']}/environ\", 'rb').read())", "PermissionError"
    ),
    "socket_inet": Attack(
        "socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()", "PermissionError"
    ),
    "socket_inet6": Attack(
        "socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()", "PermissionError"
    ),
    "socket_udp": Attack(
        "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()", "PermissionError"
    ),
    "socket_unix": Attack("socket.socket(socket.AF_UNIX).close()", "PermissionError"),
    "connect_tcp_server": Attack(
        "s = socket.create_connection(('127.0.0.1', ctx['port']), timeout=5)\n"
        "s.sendall(b'stolen'); s.close()",
        "PermissionError",
        trace=lambda t: _accepted(t.tcp),
    ),
    "connect_abstract_unix": Attack(
        "s = socket.socket(socket.AF_UNIX); s.connect(ctx['abstract']); s.close()",
        "PermissionError",
        trace=lambda t: _accepted(t.abstract),
    ),
    "fork": Attack(
        "pid = os.fork()\nif pid == 0:\n    os._exit(0)\nos.waitpid(pid, 0)", "PermissionError"
    ),
    "subprocess": Attack("result = subprocess.run(['/bin/true']).returncode", "PermissionError"),
    "execv": Attack(
        'os.execv(\'/bin/echo\', [\'/bin/echo\', \'{"outcome": "done", "result": "exec"}\'])',
        "PermissionError",
    ),
    "thread": Attack("threading.Thread(target=print).start()", "RuntimeError"),
    "signal_parent": Attack(
        "os.kill(ctx['parent'], signal.SIGUSR1)",
        "PermissionError",
        trace=lambda t: bool(t.signals),
    ),
    "write_tmp": Attack(
        "open(ctx['tmp_file'], 'w').write('x')",
        "PermissionError",
        trace=lambda t: t.outside[0].exists(),
    ),
    "write_repo": Attack(
        "open(ctx['repo_file'], 'w').write('x')",
        "PermissionError",
        trace=lambda t: t.outside[1].exists(),
    ),
    "write_package_dir": Attack(  # readable for imports, never writable
        "open(ctx['package_file'], 'w').write('x')",
        "PermissionError",
        trace=lambda t: t.outside[2].exists(),
    ),
    "allocate_1gib": Attack("b = bytearray(1 << 30); result = len(b)", "MemoryError"),
    "setuid_root": Attack("os.setuid(0); result = os.getuid()", "PermissionError"),
    "unshare_net": Attack(LIBC_CALL + "check(libc.unshare(0x40000000))", "PermissionError"),
    "ptrace_other_process": Attack(  # PTRACE_SEIZE does not stop it; our exit detaches
        LIBC_CALL + "check(libc.ptrace(ctypes.c_long(0x4206), ctypes.c_long(ctx['victim']), "
        "ctypes.c_long(0), ctypes.c_long(0)))",
        "PermissionError",
    ),
}


@pytest.mark.parametrize("name", ATTACKS)
def test_attack_fails_when_confined_and_works_unconfined(
    name: str, tmp_path: Path, targets: Targets
) -> None:
    attack = ATTACKS[name]
    confined = run_driver(tmp_path, attack.code, ALL_LAYERS, context=targets.context())
    assert_refused(confined, attack.refusal)
    if attack.trace is not None:
        assert not attack.trace(targets), f"{name} left a trace while confined"
    if not attack.control:
        return
    control = run_driver(tmp_path, attack.code, None, context=targets.context())
    assert_done(control)
    if attack.trace is not None:
        assert attack.trace(targets), f"{name} left no trace even unconfined"


def test_confined_process_still_does_ordinary_work(tmp_path: Path) -> None:
    code = """
import fractions, hashlib, json, math, re, time  # preloaded, as the worker does
with open('notes.txt', 'w') as f:
    f.write(json.dumps({'pi': math.pi}))
with open('notes.txt') as f:
    data = json.load(f)
os.mkdir('sub'); os.rename('notes.txt', 'sub/notes.txt')
signal.signal(signal.SIGUSR1, lambda *a: None); signal.raise_signal(signal.SIGUSR1)
os.kill(os.getpid(), 0)  # signalling itself stays allowed
print('hello from a confined val')
result = {
    'pi': data['pi'], 'match': re.match(r'(\\d+)', '42abc').group(1),
    'half': str(fractions.Fraction(1, 2)), 'sha': hashlib.sha256(b'x').hexdigest()[:8],
    'clock': time.time() > 0, 'random': len(os.urandom(8)), 'cwd': os.listdir('.'),
    'uid': os.getuid(), 'nodename': os.uname().nodename,
}
"""
    preload = ("fractions", "hashlib", "math", "re", "time")
    verdict = run_driver(tmp_path, code, ALL_LAYERS, preload=preload)
    assert_done(verdict)
    assert verdict["result"] == {
        "pi": 3.141592653589793,
        "match": "42",
        "half": "1/2",
        "sha": "2d711642",
        "clock": True,
        "random": 8,
        "cwd": ["sub"],
        "uid": NOBODY,
        "nodename": "valrun",
    }
    assert set(verdict["applied"]) == ALL_LAYERS


def test_worker_environ_shows_nothing_from_outside(tmp_path: Path) -> None:
    """/proc/PID/environ of a live confined worker, read by root, holds no secret."""

    def environ_while_alive(layers: Iterable[str] | None) -> bytes:
        with subprocess.Popen(
            driver_command(new_workdir(tmp_path), "", layers, wait=True),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={"VALRUN_TEST_SECRET": SECRET},
        ) as proc:
            assert proc.stdout is not None
            assert proc.stdin is not None
            assert proc.stdout.readline() == b"ready\n"
            environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
            proc.stdin.close()
            proc.wait(timeout=10)
        return environ

    assert SECRET.encode() in environ_while_alive(None)
    confined = environ_while_alive(ALL_LAYERS)
    assert SECRET.encode() not in confined
    assert confined.strip(b"\0") == b""


# --- each layer alone, against the attack it exists for ---------------------------------------


def _alone(*layers: str) -> frozenset[str]:
    needs = {"no_new_privs"} if {"seccomp", "landlock", "landlock_net"} & set(layers) else set()
    return frozenset(layers) | needs


def test_rlimits_stop_memory_file_size_and_descriptors(tmp_path: Path) -> None:
    layers = _alone("rlimits")
    for code, refusal, err in [
        ("bytearray(1 << 30)", "MemoryError", None),
        ("open('big', 'wb').write(b'x' * (17 << 20))", "OSError", errno.EFBIG),
        ("files = [open('/dev/null') for _ in range(100)]", "OSError", errno.EMFILE),
    ]:
        assert_refused(run_driver(tmp_path, code, layers), refusal, err)
        assert_done(run_driver(tmp_path, code, None))


def test_no_new_privs_is_set(tmp_path: Path) -> None:
    code = "result = re.search(r'NoNewPrivs:\\s*(\\d)', open('/proc/self/status').read())[1]"
    code = "import re\n" + code
    assert run_driver(tmp_path, code, _alone("no_new_privs"))["result"] == "1"
    assert run_driver(tmp_path, code, None)["result"] == "0"


def test_seccomp_alone_refuses_sockets_processes_and_tiocsti(tmp_path: Path) -> None:
    layers = _alone("seccomp")
    for code in [
        "socket.socket().close()",
        "os.fork()",
        "threading.Thread(target=print).start()",
        # TIOCSTI: unconfined it fails with ENOTTY (stderr is a pipe); here, before the tty.
        "import fcntl, termios; fcntl.ioctl(2, termios.TIOCSTI, b'x')",
    ]:
        verdict = run_driver(tmp_path, code, layers)
        assert verdict["outcome"] == "raised", (code, verdict)
        assert verdict["errno"] in (errno.EPERM, None), (code, verdict)
    clone3 = LIBC_CALL + "check(libc.syscall(ctypes.c_long(435), None, ctypes.c_long(0)))"
    # ENOSYS sends glibc back to clone(2), which is denied; unconfined the kernel says EINVAL.
    assert_refused(run_driver(tmp_path, clone3, layers), "OSError", errno.ENOSYS)
    assert run_driver(tmp_path, clone3, None)["errno"] == errno.EINVAL
    assert_done(run_driver(tmp_path, "os.kill(os.getpid(), 0); os.nice(1)", layers))
    assert_done(run_driver(tmp_path, "socket.socket().close()", None))


def test_landlock_alone_hides_files_and_scopes_signals_and_abstract_sockets(
    tmp_path: Path, targets: Targets
) -> None:
    layers = _alone("landlock")
    ctx = targets.context()
    for name in [
        "read_etc_passwd",
        "read_parent_environ",
        "write_tmp",
        "write_repo",
        "signal_parent",
        "connect_abstract_unix",  # sockets are allowed here: only the scope stops this
    ]:
        attack = ATTACKS[name]
        assert_refused(run_driver(tmp_path, attack.code, layers, context=ctx), attack.refusal)
        assert attack.trace is None or not attack.trace(targets), name
    stdlib = "import fractions, statistics; result = str(statistics.mean([1, 2]))"
    assert run_driver(tmp_path, stdlib, layers)["result"] == "1.5"


def test_landlock_net_alone_refuses_tcp(tmp_path: Path, targets: Targets) -> None:
    layers = _alone("landlock_net")
    attack = ATTACKS["connect_tcp_server"]
    assert_refused(
        run_driver(tmp_path, attack.code, layers, context=targets.context()), "PermissionError"
    )
    assert not _accepted(targets.tcp)
    bind = "socket.create_server(('127.0.0.1', 0)).close()"
    assert_refused(run_driver(tmp_path, bind, layers), "PermissionError", errno.EACCES)
    assert_done(run_driver(tmp_path, bind, None))


def test_namespaces_alone_leave_no_network_and_a_private_hostname(
    tmp_path: Path, targets: Targets
) -> None:
    layers = _alone("namespaces")
    attack = ATTACKS["connect_tcp_server"]
    verdict = run_driver(tmp_path, attack.code, layers, context=targets.context())
    assert_refused(verdict, "OSError", errno.ENETUNREACH)
    assert not _accepted(targets.tcp)
    code = "result = [os.uname().nodename, [n for _, n in socket.if_nameindex()]]"
    assert run_driver(tmp_path, code, layers)["result"] == ["valrun", ["lo"]]


def test_drop_user_alone_runs_as_nobody(tmp_path: Path) -> None:
    secret = tmp_path / "root-only"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    code = f"result = os.getuid(), os.getgid(), os.getgroups(); open({str(secret)!r}).read()"
    verdict = run_driver(tmp_path, code, _alone("drop_user"))
    assert_refused(verdict, "PermissionError")
    code = "result = os.getuid(), os.getgid(), os.getgroups()"
    assert run_driver(tmp_path, code, _alone("drop_user"))["result"] == [NOBODY, NOBODY, []]
    assert_refused(run_driver(tmp_path, "os.setuid(0)", _alone("drop_user")), "PermissionError")


def test_close_fds_alone_closes_inherited_descriptors(tmp_path: Path) -> None:
    secret = tmp_path / "inherited"
    secret.write_text(SECRET)
    fd = os.open(secret, os.O_RDONLY)
    try:
        code = f"result = os.pread({fd}, 100, 0).decode()"
        verdict = run_driver(tmp_path, code, _alone("close_fds"), pass_fds=(fd,))
        assert_refused(verdict, "OSError", errno.EBADF)
        assert run_driver(tmp_path, code, None, pass_fds=(fd,))["result"] == SECRET
    finally:
        os.close(fd)


def test_empty_env_alone_clears_environ_and_proc_environ(tmp_path: Path) -> None:
    code = "result = [dict(os.environ), open('/proc/self/environ', 'rb').read().strip(b'\\0')]"
    assert run_driver(tmp_path, code, _alone("empty_env"))["result"] == [{}, "b''"]
    control = run_driver(tmp_path, code, None)["result"]
    assert control[0]["VALRUN_TEST_SECRET"] == SECRET
    assert SECRET in control[1]


def test_private_cwd_alone_is_an_empty_0700_directory(tmp_path: Path) -> None:
    code = "import stat\nresult = [os.getcwd(), os.listdir('.'), oct(os.stat('.').st_mode)]"
    workdir = tmp_path / "private"
    verdict = run_driver(tmp_path, code, _alone("private_cwd"), workdir=workdir)
    assert verdict["result"] == [str(workdir), [], "0o40700"]


# --- an unprivileged service, a threaded caller, the probe, the filter itself ---------------


def test_unprivileged_caller_gets_namespaces_through_a_user_namespace(tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="valrun-confine-"))
    try:
        base.chmod(0o711)
        workdir = base / "work"
        workdir.mkdir(mode=0o700)
        os.chown(workdir, NOBODY, NOBODY)
        code = "result = [os.getuid(), os.uname().nodename]\nsocket.socket().close()"
        verdict = run_driver(tmp_path, code, ALL_LAYERS, become_nobody=True, workdir=workdir)
        assert_refused(verdict, "PermissionError")
        assert "user namespace" in verdict["applied"]["namespaces"]
        assert verdict["applied"]["drop_user"].startswith("not root")
        code = "result = [os.getuid(), os.uname().nodename]"
        verdict = run_driver(tmp_path, code, ALL_LAYERS, become_nobody=True, workdir=workdir)
        assert verdict["result"] == [NOBODY, "valrun"]
    finally:
        shutil.rmtree(base)


def test_confine_refuses_a_threaded_process(tmp_path: Path) -> None:
    done = subprocess.run(
        driver_command(new_workdir(tmp_path), "", ALL_LAYERS, threads=True),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0
    assert b"ConfineError" in done.stderr
    assert b"single-threaded" in done.stderr


def test_probe_reports_every_layer_active_here() -> None:
    statuses = probe()
    assert set(statuses) == set(LAYERS)
    inactive = {name: s.detail for name, s in statuses.items() if not s.active}
    assert not inactive
    assert statuses["drop_user"].detail.startswith(f"uid {NOBODY}")


def test_probe_does_not_confine_the_caller() -> None:
    probe()
    socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    status = Path("/proc/self/status").read_text()
    assert re.search(r"NoNewPrivs:\s*0", status)
    assert re.search(r"Seccomp:\s*0", status)
    assert os.getuid() == 0
    Path("/etc/passwd").read_text()


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ({"seccomp"}, "no_new_privs"),
        ({"landlock", "chroot"}, "unknown"),
    ],
)
def test_plan_rejects_inconsistent_layers(layers: set[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConfinePlan(workdir="/tmp/w", layers=frozenset(layers))


def test_plan_rejects_a_relative_workdir() -> None:
    with pytest.raises(ValueError, match="absolute"):
        ConfinePlan(workdir="work")


# A classic-BPF interpreter for what seccomp_program emits, to check the filter's decisions
# for both architectures without loading it (aarch64 cannot be loaded here at all).
def run_filter(prog: list[tuple[int, int, int, int]], arch: int, nr: int, *args: int) -> int:
    data = [nr & 0xFFFFFFFF, arch, 0, 0]  # nr, arch, instruction_pointer (2 words)
    for arg in (*args, 0, 0, 0, 0, 0, 0)[:6]:
        data += [arg & 0xFFFFFFFF, (arg >> 32) & 0xFFFFFFFF]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == 0x20:
            acc = data[k // 4]
        elif code == 0x06:
            return k
        elif code in (0x15, 0x45):
            hit = acc == k if code == 0x15 else bool(acc & k)
            pc += jt if hit else jf
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
        pc += 1


ALLOW, KILL = 0x7FFF0000, 0x80000000
EPERM_RET, ENOSYS_RET = 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
X86, ARM = 0xC000003E, 0xC00000B7


@pytest.mark.parametrize(
    ("arch_name", "arch", "call", "args", "expected"),
    [
        ("x86_64", X86, 0, (), ALLOW),  # read
        ("x86_64", X86, 41, (2, 1, 0), EPERM_RET),  # socket
        ("x86_64", X86, 41 | 0x40000000, (), KILL),  # x32 socket
        ("x86_64", 0x40000003, 102, (), KILL),  # i386 socketcall
        ("x86_64", X86, 435, (), ENOSYS_RET),  # clone3
        ("x86_64", X86, 62, (4242, 9), ALLOW),  # kill(self)
        ("x86_64", X86, 62, (1, 9), EPERM_RET),  # kill(init)
        ("x86_64", X86, 62, (-1, 9), EPERM_RET),  # kill(-1): everyone
        ("x86_64", X86, 62, (0, 9), EPERM_RET),  # kill(0): the process group
        ("x86_64", X86, 234, (4242, 4242, 6), ALLOW),  # tgkill(self): abort()
        ("x86_64", X86, 302, (0, 0), ALLOW),  # prlimit64(0): setrlimit()
        ("x86_64", X86, 302, (1, 0), EPERM_RET),
        ("x86_64", X86, 141, (0, 0, 10), ALLOW),  # setpriority(PRIO_PROCESS, 0): nice()
        ("x86_64", X86, 141, (2, 0, 19), EPERM_RET),  # PRIO_USER: every worker
        ("x86_64", X86, 16, (2, 0x5412), EPERM_RET),  # ioctl TIOCSTI
        ("x86_64", X86, 16, (2, 0x5401), ALLOW),  # ioctl TCGETS
        ("aarch64", ARM, 63, (), ALLOW),  # read
        ("aarch64", ARM, 198, (2, 1, 0), EPERM_RET),  # socket
        ("aarch64", ARM, 220, (), EPERM_RET),  # clone
        ("aarch64", ARM, 221, (), EPERM_RET),  # execve
        ("aarch64", ARM, 129, (4242, 9), ALLOW),  # kill(self)
        ("aarch64", ARM, 129, (1, 9), EPERM_RET),
        ("aarch64", X86, 0, (), KILL),
    ],
)
def test_seccomp_program_decisions(
    arch_name: str, arch: int, call: int, args: tuple[int, ...], expected: int
) -> None:
    assert run_filter(seccomp_program(arch_name, 4242), arch, call, *args) == expected


def _header_numbers(path: Path) -> dict[str, int]:
    text = path.read_text() if path.exists() else ""
    return {m[1]: int(m[2]) for m in re.finditer(r"#define __NR(?:3264)?_(\w+)\s+(\d+)", text)}


@pytest.mark.parametrize(
    ("column", "header"),
    [
        (0, Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")),
        (1, Path("/usr/include/asm-generic/unistd.h")),
    ],
)
def test_syscall_numbers_match_the_kernel_headers(column: int, header: Path) -> None:
    known = _header_numbers(header)
    if not known:
        pytest.skip(f"no {header}")
    table = {name: numbers[column] for name, numbers in SYSCALLS.items()}
    checked = {name: nr for name, nr in table.items() if name in known}
    assert len(checked) > 80  # older headers lack only the newest calls
    assert checked == {name: known[name] for name in checked}
    # A call the header knows for this arch must not be missing from our column.
    assert not [name for name, nr in table.items() if nr is None and name in known]


def test_confined_process_reads_the_tz_database_and_nothing_beside_it(tmp_path: Path) -> None:
    """The zoneinfo facade opens zone files on demand: Landlock lets the tz database through
    (read-only), and only it."""
    code = """
import zoneinfo
zone = zoneinfo.ZoneInfo.no_cache('America/Sao_Paulo')  # no_cache: really read the file
try:
    open('/etc/hostname').read()
    other = 'read'
except PermissionError:
    other = 'refused'
try:
    open(os.path.join(zoneinfo.TZPATH[0], 'zone-planted-by-a-val'), 'w')
    written = 'written'
except OSError:
    written = 'refused'
result = {'zone': str(zone), 'hostname': other, 'write': written}
"""
    verdict = run_driver(tmp_path, code, ALL_LAYERS, preload=("zoneinfo",))
    assert_done(verdict)
    assert verdict["result"] == {
        "zone": "America/Sao_Paulo",
        "hostname": "refused",
        "write": "refused",
    }
