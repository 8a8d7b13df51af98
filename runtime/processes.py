"""Several front-end processes on one set of listening sockets (`[server] processes = N`).

    valrun serve (the supervisor: binds, listens, watches; serves nothing itself)
      │  the listening sockets, inherited as fd://N   config as one JSON line on stdin
      ├─ python -m runtime.processes   (process 0: its own pool, fork servers, store
      ├─ python -m runtime.processes    connections, scheduler; runtime.server as with
      └─ ...                            processes = 1)

The supervisor binds every address once and listens at once, before any child exists: a
second valrun on the same port fails to bind (no SO_REUSEPORT, which would silently share the
port), and connections that arrive while a child starts or restarts wait in the kernel's
queue. The children accept from the same sockets; the kernel hands each connection to one.

A child that exits is started again, after a pause that doubles (up to `MAX_BACKOFF_S`) each
time one exits within `STABLE_S` of its start, so a child that cannot start never spins.
At start-up, a child that exits before it is ready is fatal instead: the operator's mistake
(the database, a sandbox layer) is reported once, in the child's own words, not retried.

Stopping: the first SIGTERM/SIGINT closes the supervisor's copy of the sockets and sends
SIGTERM to each child, which stops as one valrun does (runtime.server.serve_until_signalled:
in-flight requests finish, records are written, workers stop); a second signal is passed on
too, cutting the children's grace short. Children run in their own process group, so a
terminal's Ctrl-C reaches only the supervisor, which passes it on once. Each child also
watches its stdin: when the supervisor is gone (even by SIGKILL), the pipe closes and the
child stops as if it had been sent SIGTERM, so no front end outlives its supervisor.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field

import trio
from hypercorn.utils import repr_socket_addr

from runtime.accesslog import configure_logging
from runtime.config import Config, parse_config, with_bind
from runtime.errors import StartupError
from runtime.isolation import check_required, probe_layers
from runtime.server import serve_until_signalled
from runtime.startup import explain, open_store

logger = logging.getLogger(__name__)

#: A child that ran at least this long before it exited is restarted after the shortest pause.
STABLE_S = 10.0
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
#: After a child's own graceful time, how long the supervisor waits before it kills it.
KILL_AFTER_S = 15.0
READY = b"ready\n"
#: A child that cannot start says why on the same pipe, prefixed so: the supervisor's one line.
FAILED = b"failed "
#: The longest first line a child sends.
MAX_LINE_BYTES = 4096


def preflight(config: Config) -> None:
    """What would stop every child, checked once here first: the store is writable and the
    required sandbox layers exist. Its error is the one line the operator sees, as with one
    process, and nothing was started."""
    open_store(config.store.location, config.store.secret_key).close()
    check_required(probe_layers(config.sandbox.worker_uid), config.sandbox)


def bind_sockets(config: Config) -> list[socket.socket]:
    """Bind and listen on every address of `server.bind` (hypercorn's spellings); OSError
    (in use, denied) as is, with none of the sockets left open."""
    sockets: list[socket.socket] = []
    try:
        for address in config.server.bind:
            sockets.append(_listen(address, config.server.backlog))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _listen(address: str, backlog: int) -> socket.socket:
    if address.startswith("fd://"):  # already bound (systemd's socket activation)
        sock = socket.socket(fileno=int(address.removeprefix("fd://")))
    elif address.startswith("unix:"):
        path = address.removeprefix("unix:")
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                _refuse_if_served(path)
                os.remove(path)  # a socket file left by a stopped server, as hypercorn does
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        host, _, port = address.replace("[", "").replace("]", "").rpartition(":")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # never SO_REUSEPORT
    try:
        if address.startswith("unix:"):
            sock.bind(address.removeprefix("unix:"))
        elif not address.startswith("fd://"):
            sock.bind((host, int(port)))
        # Listening at once is what makes the port taken: Linux lets two SO_REUSEADDR
        # sockets bind one port while neither listens.
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _refuse_if_served(path: str) -> None:
    """EADDRINUSE when a server answers on the socket file `path`: it is not left over."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return
    raise OSError(errno.EADDRINUSE, f"{path} is being served", path)


def urls_of(sockets: list[socket.socket]) -> list[str]:
    return [f"http://{repr_socket_addr(s.family, s.getsockname())}" for s in sockets]


@dataclass
class Child:
    """One front-end process's slot: the process in it now, and how it has been going."""

    index: int
    process: trio.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = FIRST_BACKOFF_S
    ready: bool = False
    #: Set when the process now in the slot has exited.
    gone: trio.Event = field(default_factory=trio.Event)


#: How the supervisor starts a child (its index is appended).
CHILD_COMMAND = (sys.executable, "-m", "runtime.processes")


class Supervisor:
    def __init__(
        self,
        config: Config,
        sockets: list[socket.socket],
        command: Sequence[str] = CHILD_COMMAND,
    ) -> None:
        self.config = config
        self.sockets = sockets
        self.command = tuple(command)
        fds = tuple(f"fd://{s.fileno()}" for s in sockets)
        self._payload = json.dumps(asdict(with_bind(config, fds))).encode() + b"\n"
        self._pass_fds = tuple(s.fileno() for s in sockets)
        self.children = [Child(i) for i in range(config.server.processes)]
        self.stopping = False
        self.kill_after_s = KILL_AFTER_S
        #: Set once every child is ready, or one failed before it was (`failed` says which).
        self.started = trio.Event()
        self.failed: str | None = None

    def pids(self) -> list[int]:
        return [c.process.pid for c in self.children if c.process and c.process.returncode is None]

    def signal_children(self, signum: int) -> None:
        for child in self.children:
            if child.process is not None and child.process.returncode is None:
                child.process.send_signal(signum)

    async def _start(self, child: Child) -> trio.Process:
        process = await trio.lowlevel.open_process(
            [*self.command, str(child.index)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=self._pass_fds,
            process_group=0,  # a terminal's Ctrl-C is the supervisor's to pass on
        )
        child.process, child.started_at, child.gone = process, time.monotonic(), trio.Event()
        assert process.stdin is not None
        await process.stdin.send_all(self._payload)
        return process

    async def run_child(self, child: Child) -> None:
        """Keep `child`'s slot filled until the supervisor stops."""
        while not self.stopping:
            try:
                process = await self._start(child)
            except OSError as exc:  # cannot exec (too many processes or files, a lost venv)
                if not self.started.is_set():
                    self.failed = self.failed or f"cannot start a front-end process: {exc}"
                    self.started.set()
                    return
                logger.error("cannot start front-end process %d: %s", child.index, exc)
                await trio.sleep(child.backoff_s)
                child.backoff_s = min(child.backoff_s * 2, MAX_BACKOFF_S)
                continue
            try:
                if self.stopping:  # started while stop() was signalling the others
                    process.send_signal(signal.SIGTERM)
                assert process.stdout is not None
                line = await _read_line(process.stdout)
                if line == READY:
                    child.ready = True
                    if all(c.ready for c in self.children):
                        self.started.set()
                    if child.restarts:
                        logger.info(
                            "front-end process %d (pid %d) is serving", child.index, process.pid
                        )
                status = await process.wait()
            finally:
                if process.returncode is None:  # cancelled: never leave a child behind
                    process.kill()
                    with trio.CancelScope(shield=True):
                        await process.wait()
                child.gone.set()
                for pipe in (process.stdin, process.stdout):
                    if pipe is not None:
                        await pipe.aclose()
            if self.stopping:
                return
            if not self.started.is_set():
                # Its own one-line reason, when it said one; the first child's to fail wins.
                said = line.removeprefix(FAILED).decode(errors="replace").strip()
                if self.failed is None:
                    self.failed = (
                        said
                        if line.startswith(FAILED) and said
                        else f"front-end process {child.index} exited with status {status} "
                        "before it was ready (its error is above)"
                    )
                self.started.set()
                return
            lived_s = time.monotonic() - child.started_at
            if lived_s >= STABLE_S:
                child.backoff_s = FIRST_BACKOFF_S
            logger.warning(
                "front-end process %d (pid %d) exited with status %d after %.1f s; "
                "starting another in %.1f s",
                *(child.index, process.pid, status, lived_s, child.backoff_s),
            )
            await trio.sleep(child.backoff_s)
            child.backoff_s = min(child.backoff_s * 2, MAX_BACKOFF_S)
            child.restarts += 1

    async def stop(self) -> None:
        """Close the sockets, ask every child to stop, and kill one that overstays."""
        self.stopping = True
        for sock in self.sockets:
            sock.close()
        self.signal_children(signal.SIGTERM)
        server = self.config.server
        with trio.move_on_after(server.drain_s + server.shutdown_timeout_s + self.kill_after_s):
            for child in self.children:
                if child.process is not None and child.process.returncode is None:
                    await child.gone.wait()
        for pid in self.pids():
            logger.error("front-end process %d did not stop in time: killing it", pid)
        self.signal_children(signal.SIGKILL)


async def _read_line(stream: trio.abc.ReceiveStream) -> bytes:
    line = b""
    while not line.endswith(b"\n") and len(line) < MAX_LINE_BYTES:
        chunk = await stream.receive_some(MAX_LINE_BYTES - len(line))
        if not chunk:
            break
        line += chunk
    return line


async def serve_processes(
    supervisor: Supervisor,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the supervisor's children until `shutdown_trigger` returns, then stop them all;
    report the URLs once every child is ready."""
    async with trio.open_nursery() as nursery:
        for child in supervisor.children:
            nursery.start_soon(supervisor.run_child, child)
        stop = trio.Event()

        async def wait_for_trigger() -> None:
            await shutdown_trigger()
            stop.set()
            supervisor.started.set()  # a signal during start-up stops at once

        nursery.start_soon(wait_for_trigger)
        await supervisor.started.wait()
        if supervisor.failed is None:
            task_status.started(urls_of(supervisor.sockets))
            await stop.wait()
        await supervisor.stop()
        nursery.cancel_scope.cancel()
    if supervisor.failed is not None:
        raise StartupError(supervisor.failed)


async def serve_processes_until_signalled(
    config: Config,
    sockets: list[socket.socket],
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The supervisor as `valrun serve` runs it: until SIGINT or SIGTERM. Each later signal
    is passed on to the children, which then cut their grace short."""
    supervisor = Supervisor(config, sockets)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        stopping = trio.Event()

        async def watch() -> None:
            async for signum in signals:
                name = signal.Signals(signum).name
                if not stopping.is_set():
                    logger.info("received %s: stopping the front-end processes", name)
                    stopping.set()
                else:
                    logger.warning("received %s again: passing it on", name)
                    supervisor.signal_children(signal.SIGTERM)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await serve_processes(
                supervisor, shutdown_trigger=stopping.wait, task_status=task_status
            )
            nursery.cancel_scope.cancel()


# The child: `python -m runtime.processes INDEX`, config on stdin.


async def serve_child(config: Config, ready: list[bool]) -> None:
    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as serving:
            await serving.start(serve_until_signalled, config)
            os.write(1, READY)
            ready.append(True)
            os.dup2(2, 1)  # nobody reads stdout any more: what is printed goes to the log
            nursery.start_soon(stop_when_orphaned)
        nursery.cancel_scope.cancel()


async def stop_when_orphaned() -> None:
    """Stop as on SIGTERM once the supervisor is gone (its end of stdin closes)."""
    stdin = trio.lowlevel.FdStream(os.dup(0))
    while await stdin.receive_some():
        pass
    logger.warning("the supervisor is gone: stopping")
    os.kill(os.getpid(), signal.SIGTERM)


def child_main(argv: list[str]) -> int:
    index = int(argv[0])
    configure_logging(f" [{index}]")
    config = parse_config(json.loads(sys.stdin.buffer.readline()))
    if not all(bind.startswith("fd://") for bind in config.server.bind):
        # A child binds nothing itself: that would take a port the supervisor does not hold.
        print(
            "valrun: runtime.processes serves only sockets its supervisor passes", file=sys.stderr
        )
        return 2
    ready: list[bool] = []
    try:
        trio.run(serve_child, config, ready)
    except Exception as exc:
        message = explain(exc, config)
        if message is None:
            raise
        if ready:
            print(f"valrun: {message}", file=sys.stderr)
        else:  # the supervisor says it, once, for all its children
            os.write(1, FAILED + " ".join(message.split()).encode()[: MAX_LINE_BYTES - 16] + b"\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
