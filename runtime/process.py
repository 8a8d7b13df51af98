"""Handles on worker processes: exchange frames with one, kill it, learn how it ended.

Two kinds, one interface (`WorkerProcess`):
- `ForkedWorker`: made by the fork server (sandbox/forkserver.py), the normal path. The front
  end holds the worker's socket and a pidfd; the fork server reaps it and reports its exit.
  If the fork server dies, its workers live on: the front end, their subreaper, reaps them.
- `SpawnedWorker`: a direct subprocess running any command; used to test the front end
  against fake, hostile workers.

A handle knows nothing of vals or HTTP; it moves frames and turns every way a process can
misbehave (EOF, garbage, an oversized frame) into a WorkerError.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from runtime.errors import WorkerError
from sandbox.limits import SERVING_NICE
from sandbox.syscalls import prctl
from sandbox.wire import Frame, FrameDecoder, FrameTooLargeError, ProtocolError, encode_frame

logger = logging.getLogger(__name__)

# -I: isolated mode, no PYTHON* variables, no user site, no cwd on sys.path.
WORKER_COMMAND = (sys.executable, "-I", "-m", "sandbox.worker")
FORK_SERVER_COMMAND = (sys.executable, "-I", "-m", "sandbox.forkserver")
RECEIVE_CHUNK_BYTES = 65536
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


class WorkerProcess:
    def __init__(self, pid: int, stream: trio.abc.HalfCloseableStream, max_body_bytes: int):
        self.pid = pid
        self.stream = stream
        self.decoder = FrameDecoder(max_body_bytes=max_body_bytes)
        self.returncode: int | None = None
        self._exited = trio.Event()
        # Several tasks send to a worker with requests pipelined (runtime.pipeline): the
        # requests' tasks, and the head's answers to its asks. One frame at a time.
        self._sending = trio.StrictFIFOLock()
        #: For `send_nowait`: the socket itself (non-blocking), where the worker has one.
        self.raw_socket: socket.socket | None = None
        #: What `send_nowait` could not send of a frame, and the task that holds `_sending`
        #: until it has sent it.
        self._rest: tuple[trio.lowlevel.Task, memoryview] | None = None

    @property
    def alive(self) -> bool:
        return self.returncode is None

    def exited(self, returncode: int) -> None:
        self.returncode = returncode
        self._exited.set()

    def kill(self) -> None:
        raise NotImplementedError

    def still_running(self) -> bool:
        """Ask the kernel, not the exit report, which may still be on its way."""
        return self.alive

    def rss_bytes(self) -> int | None:
        """Resident memory, from /proc/PID/statm (proc(5)); None if it cannot be read."""
        if not self.still_running():  # the pid names this worker only while it runs
            return None
        try:
            with open(f"/proc/{self.pid}/statm", "rb") as f:
                return int(f.read().split()[1]) * PAGE_BYTES
        except (OSError, ValueError, IndexError):
            return None

    def demote(self) -> bool:
        """Run only when no one else wants the CPU (SCHED_IDLE, sched(7)). False if not allowed.

        For a request that has run long: a val spinning at 100 % CPU then takes only what the
        front end and the other workers leave. Needs CAP_SYS_NICE or the same uid.
        """
        return self._schedule(os.SCHED_IDLE)

    def promote(self) -> None:
        """Back to normal scheduling at the workers' nice, once its request is answered."""
        if self._schedule(os.SCHED_OTHER):
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, self.pid, SERVING_NICE)

    def _schedule(self, policy: int) -> bool:
        # The pid is safe to name while still_running(): the fork server cannot have reaped
        # it, so it cannot have been reused.
        if not self.still_running():
            return False
        try:
            os.sched_setscheduler(self.pid, policy, os.sched_param(0))
        except OSError:  # EPERM without CAP_SYS_NICE as another uid; ESRCH if it just died
            return False
        return True

    def send_nowait(self, frame: Frame) -> bool:
        """Send `frame` now, without a wait or a task switch, if that can be done: nothing
        else is being sent, and the socket's buffer takes the bytes at once. True when the
        whole frame went. False when it did not: then the caller must `send` it next, in the
        same task (which sends what is left of it, if part went; meanwhile no other frame
        can be sent). This is the warm request's path: a small frame into a worker that
        reads, with none of `send`'s lock, cancel scopes and readiness waits."""
        raw = self.raw_socket
        if raw is None or self._sending.locked():
            return False
        data = encode_frame(frame)
        try:
            sent = raw.send(data)
        except OSError:  # would block, or broken: `send` waits, or reports the worker's end
            return False
        if sent == len(data):
            return True
        self._sending.acquire_nowait()  # no checkpoint: no other frame went meanwhile
        self._rest = (trio.lowlevel.current_task(), memoryview(data)[sent:])
        return False

    async def send(self, frame: Frame) -> None:
        try:
            if self._rest is not None and self._rest[0] is trio.lowlevel.current_task():
                rest = self._rest[1]  # `send_nowait` sent the first part of this frame
                self._rest = None
                try:
                    await self.stream.send_all(rest)
                finally:
                    self._sending.release()
                return
            async with self._sending:
                await self.stream.send_all(encode_frame(frame))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise await self._died("while being sent a request") from None

    async def receive(self) -> Frame:
        while True:
            try:
                frame = self.decoder.next_frame()
            except FrameTooLargeError as exc:
                kind = "response_too_large" if exc.part == "body" else "protocol_error"
                raise WorkerError(f"the worker sent a {exc}", kind) from None
            except ProtocolError as exc:
                raise WorkerError(
                    f"the worker broke the protocol: {exc}", "protocol_error"
                ) from None
            if frame is not None:
                return frame
            try:
                chunk = await self.stream.receive_some(RECEIVE_CHUNK_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                chunk = b""
            if not chunk:
                raise await self._died("before it replied")
            self.decoder.feed(bytes(chunk))

    async def _died(self, when: str) -> WorkerError:
        # The exit report comes from the fork server (nice 10): on a busy machine it can take
        # a moment, and without it a CPU-limit kill would be reported as a crash.
        with trio.move_on_after(3):
            await self._exited.wait()
        code = self.returncode
        if code is not None and code < 0:
            if -code == signal.SIGXCPU:  # the soft RLIMIT_CPU the worker armed
                return WorkerError(f"the worker hit its CPU time limit {when}", "cpu_limit")
            how = f"was killed by signal {-code}"
        else:
            how = f"exited with status {code}"
        return WorkerError(f"the worker {how} {when}", "worker_crashed")

    async def aclose(self, grace_s: float = 2.0) -> None:
        """Ask the worker to exit (EOF on its input), then kill it if it does not."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(grace_s):
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.stream.send_eof()
                await self._exited.wait()
            if self.alive:
                self.kill()
                with trio.move_on_after(grace_s):
                    await self._exited.wait()
            await self.stream.aclose()


class SpawnedWorker(WorkerProcess):
    def __init__(self, process: trio.Process, max_body_bytes: int) -> None:
        assert process.stdin is not None
        assert process.stdout is not None
        stream = trio.StapledStream(process.stdin, process.stdout)
        super().__init__(process.pid, stream, max_body_bytes)
        self.process = process

    @classmethod
    async def spawn(
        cls,
        nursery: trio.Nursery,
        *,
        cwd: Path,
        max_body_bytes: int,
        command: tuple[str, ...] = WORKER_COMMAND,
        inherit_stderr: bool = False,
    ) -> SpawnedWorker:
        process = await trio.lowlevel.open_process(
            list(command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if inherit_stderr else subprocess.DEVNULL,
            env={},  # no secret reaches a worker through its environment (docs/contract.md §11.3)
            cwd=cwd,
        )
        worker = cls(process, max_body_bytes)
        nursery.start_soon(worker._reap)
        return worker

    async def _reap(self) -> None:
        # Shielded like the fork server's reader: `aclose` kills the process if need be.
        with trio.CancelScope(shield=True):
            self.exited(await self.process.wait())

    def kill(self) -> None:
        if self.alive:
            self.process.kill()

    def still_running(self) -> bool:
        return self.alive and self.process.poll() is None


class ForkedWorker(WorkerProcess):
    def __init__(self, pid: int, sock: trio.socket.SocketType, pidfd: int, max_body_bytes: int):
        super().__init__(pid, trio.SocketStream(sock), max_body_bytes)
        self.pidfd = pidfd
        self._sock = sock
        # Asked before every request (`still_running`): built once.
        self._exit_poll = select.poll()
        self._exit_poll.register(pidfd, select.POLLIN)

    def discard(self) -> None:
        """Close the socket of a worker that was never handed out (no checkpoint: cleanup)."""
        self._sock.close()

    def exited(self, returncode: int) -> None:
        super().exited(returncode)
        with contextlib.suppress(OSError):
            os.close(self.pidfd)

    def still_running(self) -> bool:
        # A pidfd becomes readable when its process exits (pidfd_open(2)).
        if not self.alive:
            return False
        return not self._exit_poll.poll(0)

    def kill(self) -> None:
        if self.alive:
            # Through the pidfd: it names this process, never a later one that reused the pid.
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    async def reap_orphan(self) -> None:
        """After its fork server died: wait for this worker's exit and reap it ourselves."""
        try:
            await trio.lowlevel.wait_readable(self.pidfd)
        except trio.Cancelled:  # the service is stopping: it must not outlive it
            self.kill()
            raise
        try:
            # The front end is the subreaper (runtime.process.become_subreaper): the orphan
            # is its child now, and waitid gives its real exit status.
            # The pidfd said it exited: this returns at once.
            result = os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED)  # noqa: ASYNC222
        except ChildProcessError:  # reaped by init instead: how it ended is not known
            self.exited(-signal.SIGKILL)
            return
        if result is None:  # only with WNOHANG, which is not asked for
            self.exited(-signal.SIGKILL)
        elif result.si_code == os.CLD_EXITED:
            self.exited(result.si_status)
        else:  # killed or dumped: the signal
            self.exited(-result.si_status)


def become_subreaper() -> None:
    """Orphaned descendants (the workers of a fork server that died) become this process's
    children, for it to reap, instead of init's (prctl(2) PR_SET_CHILD_SUBREAPER)."""
    prctl(PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(1))


class ForkServerError(Exception):
    """No worker from the fork server: it is gone, wedged, or could not start."""


class SpawnFailedError(ForkServerError):
    """The fork server is fine but could not make this worker (fork failed with EAGAIN at
    the process limit, descriptors ran out on either side): trying again later may work."""


class ForkServerHandle:
    """The front end's handle on sandbox/forkserver.py."""

    def __init__(
        self,
        process: trio.Process,
        control: trio.socket.SocketType,
        max_body: int,
        nursery: trio.Nursery,
    ):
        self.process = process
        self._nursery = nursery
        self.control = control
        self.max_body_bytes = max_body
        self.workers: dict[int, ForkedWorker] = {}
        self.closed = False
        self.gone = trio.Event()  # its control channel ended: it and its workers are dead
        self._spawn_lock = trio.Lock()
        # A worker, or why this spawn failed.
        send, self._spawned = trio.open_memory_channel[ForkedWorker | str](1)
        self._spawned_send = send

    @classmethod
    async def start(
        cls,
        nursery: trio.Nursery,
        *,
        workdir: Path,
        plan: dict[str, object],
        max_body_bytes: int,
        inherit_stderr: bool,
    ) -> ForkServerHandle:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            process = await trio.lowlevel.open_process(
                list(FORK_SERVER_COMMAND),
                stdin=theirs.fileno(),
                stdout=subprocess.DEVNULL,
                stderr=None if inherit_stderr else subprocess.DEVNULL,
                env={},  # the fork server and its workers never see the front end's secrets
                cwd=workdir,
            )
        server = cls(process, trio.socket.from_stdlib_socket(ours), max_body_bytes, nursery)
        configure = {"op": "configure", "workdir": str(workdir), "plan": plan}
        await server.control.send(json.dumps(configure).encode())
        nursery.start_soon(server._serve_control)
        return server

    async def spawn(self) -> ForkedWorker:
        async with self._spawn_lock:  # replies come in request order
            try:
                await self.control.send(b'{"op": "spawn"}')
            except OSError as exc:
                raise ForkServerError(f"the fork server is gone: {exc}") from None
            try:
                spawned = await self._spawned.receive()
            except trio.EndOfChannel:
                raise ForkServerError("the fork server exited") from None
            if isinstance(spawned, str):
                raise SpawnFailedError(spawned)
            return spawned

    def kill(self) -> None:
        """Kill a fork server that stopped answering; its control reader then ends."""
        if self.process.returncode is None:
            self.process.kill()

    async def _serve_control(self) -> None:
        fd_space = socket.CMSG_SPACE(2 * array.array("i").itemsize)
        # Shielded: closing workers needs their exit reports even while the service is being
        # cancelled. It ends at the fork server's EOF, which `aclose` brings about.
        try:
            with trio.CancelScope(shield=True):
                await self._read_control(fd_space)
        except (ValueError, KeyError, TypeError) as exc:  # garbage on the control channel
            logger.error("the fork server broke its protocol (%s); killing it", exc)
            self.kill()
        finally:
            self.closed = True
            # close(), not aclose(): this runs while the service is being cancelled, and a
            # checkpoint here would skip the rest (the socket and pidfds would leak).
            self._spawned_send.close()
            # A worker whose spawner was cancelled waits in the channel; nobody will take it.
            with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                while True:
                    unclaimed = self._spawned.receive_nowait()
                    if isinstance(unclaimed, ForkedWorker):
                        unclaimed.discard()
            # Its workers live on: they finish their requests, and their pidfds still let
            # the front end kill them at their wall time. The front end, their subreaper
            # now, reaps them and learns how they ended (nobody else will report it).
            for worker in self.workers.values():
                self._nursery.start_soon(worker.reap_orphan)
            self.workers.clear()
            self._nursery.start_soon(self.process.wait)  # no zombie fork server either
            # A worker spawned for a request that gave up waiting (a timeout) was never
            # handed out: no one else will ever close it.
            while True:
                try:
                    undelivered = self._spawned.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                if not isinstance(undelivered, str):
                    undelivered.kill()
            self.control.close()
            self.gone.set()

    async def _read_control(self, fd_space: int) -> None:
        while True:
            try:
                message, ancillary, flags, _addr = await self.control.recvmsg(65536, fd_space)
            except OSError as exc:  # ECONNRESET when it died with our messages unread
                logger.error("the fork server's control channel failed: %s", exc)
                return
            if not message:
                return
            fds = _received_fds(ancillary)
            head = json.loads(message)
            if head["op"] == "spawn_failed":
                await self._spawned_send.send(f"the fork server could not fork: {head['error']}")
            elif head["op"] == "spawned" and (flags & socket.MSG_CTRUNC or len(fds) != 2):
                # Out of descriptors here: the kernel cut the SCM_RIGHTS message. Whatever
                # did arrive is closed; the worker sees EOF on its socket and exits.
                for fd in fds:
                    os.close(fd)
                await self._spawned_send.send(
                    "the front end could not receive the worker's descriptors "
                    "(out of file descriptors?)"
                )
            elif head["op"] == "spawned":
                sock_fd, pidfd = fds
                raw = socket.socket(fileno=sock_fd)
                sock = trio.socket.from_stdlib_socket(raw)  # the same socket, non-blocking
                worker = ForkedWorker(head["pid"], sock, pidfd, self.max_body_bytes)
                worker.raw_socket = raw
                self.workers[worker.pid] = worker
                await self._spawned_send.send(worker)
            elif head["op"] == "exited":
                exited = self.workers.pop(head["pid"], None)
                if exited is not None:
                    exited.exited(head["status"])

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            # EOF, not close: the control reader is waiting on this socket, and sees the
            # fork server's own EOF once it has gone.
            with contextlib.suppress(OSError):
                self.control.shutdown(socket.SHUT_WR)
            with trio.move_on_after(5):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


class SupervisedForkServer:
    """A fork server that is started again if it dies, so one lost process (a val that
    escaped and killed its parent, an operator's stray `kill`) cannot take valrun down."""

    def __init__(
        self, start: Callable[[], Awaitable[ForkServerHandle]], *, spawn_timeout_s: float = 10.0
    ) -> None:
        self._start = start  # ForkServerHandle.start with its arguments bound
        self.spawn_timeout_s = spawn_timeout_s
        self.server: ForkServerHandle | None = None
        self.restarts = 0
        self._lock = trio.Lock()  # one restart, however many tasks notice the death

    async def start(self) -> ForkServerHandle:
        try:
            self.server = await self._start()
        except OSError as exc:  # EAGAIN at the process limit, EMFILE: not now, not fatal
            raise ForkServerError(f"cannot start a fork server: {exc}") from exc
        return self.server

    @property
    def restarting(self) -> bool:
        """True while the fork server is dead and no new one has come up yet."""
        return self.server is None or self.server.closed

    async def _current(self) -> ForkServerHandle:
        async with self._lock:
            old = self.server
            if old is not None and not old.closed:
                return old
            if old is not None:
                self.restarts += 1
                logger.error("the fork server died; starting a new one")
                if old.process.returncode is None:
                    old.process.kill()
                with trio.CancelScope(shield=True):
                    await old.process.wait()  # reap it; it is dead or killed, so this is quick
                self.server = None  # said once: a start that fails below does not repeat it
            return await self.start()

    async def serve_restarts(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Replace a fork server as soon as it dies, not when a request next needs one: while
        it is down, /healthz says so."""
        task_status.started()
        failing = False
        while True:
            server = self.server
            if server is not None and not server.closed:
                await server.gone.wait()
            try:
                await self._current()
            except ForkServerError as exc:
                if not failing:
                    logger.error("%s; retrying every second", exc)
                failing = True
                await trio.sleep(1)
            else:
                failing = False

    async def spawn(self) -> WorkerProcess:
        for _attempt in range(2):
            server = await self._current()
            with trio.move_on_after(self.spawn_timeout_s):
                try:
                    worker: WorkerProcess = await server.spawn()
                    return worker
                except SpawnFailedError:
                    raise  # the fork server is fine; a new one would fail the same way
                except ForkServerError as exc:
                    logger.error("%s", exc)
                    server.closed = True
                    continue
            # Stopped (SIGSTOP) or wedged: a fork server that does not answer is replaced.
            logger.error(
                "the fork server did not answer within %s s; replacing it", self.spawn_timeout_s
            )
            server.kill()
            server.closed = True
        raise ForkServerError("the fork server failed twice in a row")

    async def aclose(self) -> None:
        if self.server is not None:
            await self.server.aclose()
