"""The accept path: hypercorn's trio server, with every connection counted at accept.

hypercorn's own `serve` builds its listeners inside and hands each accepted stream straight
to its protocol code; its limits are per connection (`keep_alive_timeout`, which also bounds
how long a request's head may take, and `read_timeout`, which a client sending one byte a
second never trips), never per client. So valrun starts the same pieces itself
(`serve_app` follows `hypercorn.trio.run.worker_serve`), with each listener wrapped in a
`CappedListener`: a connection beyond `server.max_connections` in all, or beyond
`server.max_connections_per_address` from one address, is closed as soon as it is accepted,
before it costs a task or a buffer. The accept path is the one place that sees every
connection before anything is spent on it, TLS handshakes included (the TLS listener wraps
this one). The body's own deadline is the app's (`runtime.http.read_body`).

Cleartext HTTP/2 (`server.h2c`, off by default): hypercorn switches to HTTP/2 on a
connection that starts with the HTTP/2 preface, or on `Upgrade: h2c`. With it off, the
stream refuses both with a 400 and closes: HTTP/2 streams are cheap to open and reset, and a
reset stream is an abandoned request; over TLS (ALPN) HTTP/2 stays.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import resource
import socket
import struct
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, RawData
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import TrioSingleTask, WorkerContext
from hypercorn.typing import ASGIFramework, ConnectionState, LifespanState, TaskGroup
from hypercorn.typing import Event as HypercornEvent
from hypercorn.utils import ShutdownError, raise_shutdown, repr_socket_addr, wrap_app

from runtime.config import ServerConfig

logger = logging.getLogger(__name__)

#: Descriptors kept for everything but client connections: the store, workers' sockets and
#: pidfds, the fork servers, storage files.
RESERVED_FDS = 1024
#: How the preface of cleartext HTTP/2 with prior knowledge starts (RFC 9113 §3.4).
H2_PREFACE = b"PRI * HTTP/2.0\r\n"
#: What hypercorn sends before it switches a connection to h2c (RFC 7540 §3.2): a whole
#: response head, in one write, naming the upgrade.
SWITCHING = b"HTTP/1.1 101 "
SWITCHING_TO_H2C = b"\r\nupgrade: h2c\r\n"
#: A request asking for it (RFC 7540 §3.2), as a line of what the client sent.
ASKS_FOR_H2C = re.compile(rb"\nupgrade:[ \t]*h2c[ \t]*\r?\n", re.IGNORECASE)
#: How long a refused connection's late bytes are read and dropped before it is closed.
LINGER_S = 2.0
#: A held response head is sent together with a following write up to this size, and
#: before a larger one (which would otherwise be copied for it).
COALESCE_MAX_BYTES = 64 * 1024


def refusal(status: str, error_type: str, message: str) -> bytes:
    """A whole HTTP/1.1 error answer, in the shape of every valrun error, that closes."""
    body = json.dumps({"error": {"type": error_type, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


H2C_REFUSAL = refusal(
    "400 Bad Request",
    "h2c_refused",
    "cleartext HTTP/2 is off here (server.h2c): use HTTP/1.1, or HTTP/2 over TLS",
)


class ConnectionCaps:
    """Open connections, in all and per client address."""

    @classmethod
    def from_config(cls, server: ServerConfig) -> ConnectionCaps:
        return cls(server.max_connections, server.max_connections_per_address)

    def __init__(self, total: int, per_address: int) -> None:
        self.total = total
        self.per_address = per_address
        self.open = 0
        self.by_address: dict[str, int] = {}
        self.refused = 0

    def admit(self, address: str) -> bool:
        held = self.by_address.get(address, 0)
        if self.open >= self.total or held >= self.per_address:
            self.refused += 1
            return False
        self.open += 1
        self.by_address[address] = held + 1
        return True

    def gauges(self) -> dict[str, int]:
        """For /healthz: connections open, client addresses holding them, refused so far."""
        return {"open": self.open, "addresses": len(self.by_address), "refused": self.refused}

    def release(self, address: str) -> None:
        self.open -= 1
        held = self.by_address[address] - 1
        if held:
            self.by_address[address] = held
        else:
            del self.by_address[address]


def peer_address(sock: trio.socket.SocketType) -> str:
    """The client's IP address (the unit of the per-address cap); `unix` for a Unix socket."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return "unix"
    try:
        return str(sock.getpeername()[0])
    except OSError:  # already reset by the client
        return "gone"


class CountedStream(trio.abc.HalfCloseableStream):
    """An accepted connection that gives its place back when closed; with `refuse_h2c`,
    one that answers cleartext HTTP/2 with a 400 instead of letting hypercorn speak it."""

    def __init__(
        self, inner: trio.SocketStream, caps: ConnectionCaps, address: str, refuse_h2c: bool
    ) -> None:
        self.inner = inner
        self.socket = inner.socket  # hypercorn's TCPServer reads the addresses from it
        self._caps = caps
        self._address = address
        self._released = False
        self._sniffing = refuse_h2c  # until the connection's first bytes are known
        self._watch_upgrade = refuse_h2c
        self._start = b""
        self._tail = b""  # the end of what the client last sent, for a line cut in two
        self._asked_for_h2c = False
        self._refused = False
        self._lingered = False
        #: A final response head, sent together with the write that follows it (`send_all`).
        self._held = b""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._refused:
            return b""
        data = bytes(await self.inner.receive_some(max_bytes))
        if self._watch_upgrade and not self._asked_for_h2c:
            self._asked_for_h2c = ASKS_FOR_H2C.search(self._tail + data) is not None
            self._tail = data[-64:]
        if not self._sniffing or not data:
            return data
        self._start += data
        if H2_PREFACE.startswith(self._start[: len(H2_PREFACE)]):
            if len(self._start) < len(H2_PREFACE):
                return await self.receive_some(max_bytes)  # not yet known
            await self._refuse()
            return b""
        self._sniffing = False
        data, self._start = self._start, b""
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._refused:
            return  # hypercorn's HTTP/2 after a refused upgrade: nobody is to read it
        if self._asked_for_h2c and is_h2c_switch(bytes(data[:4096])):
            await self._refuse()
            return
        if self._held:
            head, self._held = self._held, b""
            if len(data) > COALESCE_MAX_BYTES:  # not worth a copy of a large body
                await self.inner.send_all(head)
            else:
                data = head + data
        elif is_final_head(data):
            # hypercorn writes a response as its head, its body, then its end (h11's end
            # of a Content-Length body is empty, yet still written): each write a send(2)
            # of its own, and a TCP segment of its own (TCP_NODELAY). The head waits for the
            # next write, whatever it is, so the response leaves in one.
            self._held = bytes(data)
            return
        await self.inner.send_all(data)

    async def _refuse(self) -> None:
        self._refused = True
        self._sniffing = False
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.inner.send_all(H2C_REFUSAL)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if self._held:
            data, self._held = self._held, b""
            await self.inner.send_all(data)
        await self.inner.send_eof()

    async def aclose(self) -> None:
        if not self._released:
            self._released = True
            self._caps.release(self._address)
        try:
            if self._refused and not self._lingered:
                self._lingered = True
                await self._linger()
        finally:
            await self.inner.aclose()

    async def _linger(self) -> None:
        """After a refusal, read and drop what the client still sends, for a moment: a
        socket closed with unread bytes is reset, and a reset can cost the client the
        refusal it has not read yet (an HTTP/2 client sends its settings and first request
        right behind the preface)."""
        with trio.move_on_after(LINGER_S):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.inner.send_eof()
                while await self.inner.receive_some(65536):
                    pass


def is_final_head(data: bytes | bytearray | memoryview) -> bool:
    """Whether a write is a whole HTTP/1.x final response head (status 2xx-5xx). An interim
    one (`100 Continue`, `101`) is never held: the client waits for it before sending more."""
    return (
        len(data) >= 16
        and data[:9] in (b"HTTP/1.1 ", b"HTTP/1.0 ")
        and data[9:10] in (b"2", b"3", b"4", b"5")
        and data[-4:] == b"\r\n\r\n"
    )


def is_h2c_switch(data: bytes) -> bool:
    """Whether a write is hypercorn's `101` that switches the connection to h2c: a whole
    response head (never a body chunk of a val's, unless it is byte for byte one)."""
    return data.startswith(SWITCHING) and SWITCHING_TO_H2C in data and data.endswith(b"\r\n\r\n")


class CappedListener(trio.abc.Listener[CountedStream]):
    def __init__(self, inner: trio.SocketListener, caps: ConnectionCaps, refuse_h2c: bool):
        self.inner = inner
        self.caps = caps
        self.refuse_h2c = refuse_h2c

    async def accept(self) -> CountedStream:
        while True:
            stream = await self.inner.accept()
            address = peer_address(stream.socket)
            if self.caps.admit(address):
                return CountedStream(stream, self.caps, address, self.refuse_h2c)
            if self.caps.refused == 1 or self.caps.refused % 1000 == 0:
                logger.warning(
                    "connection from %s closed at accept: %d open in all (server.max_"
                    "connections %d), %d from that address (per-address cap %d); %d so far",
                    address,
                    self.caps.open,
                    self.caps.total,
                    self.caps.by_address.get(address, 0),
                    self.caps.per_address,
                    self.caps.refused,
                )
            # An abortive close (RST): no FIN_WAIT state kept for a client that floods.
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()

    async def aclose(self) -> None:
        await self.inner.aclose()


class IdleTimer(TrioSingleTask):
    """A connection's keep-alive timer, in place of hypercorn's `TrioSingleTask` (its
    `restart` and `stop`): one task for the connection's life whose deadline moves, where
    hypercorn starts a task when a response ends and cancels it when the next request begins
    (`Nursery.start` and a lock, twice a request: measured, 75 µs of the front end's 530).

    As hypercorn's: a connection idle for `keep_alive_timeout` is closed, and an idle one is
    closed at once when the server stops; a busy one is closed once its response is sent.
    """

    def __init__(self, timeout_s: float, terminated: HypercornEvent) -> None:
        super().__init__()
        self.timeout_s = timeout_s
        self.terminated = terminated
        self.idle = False
        self._finished = False
        self._scope: trio.CancelScope | None = None

    async def restart(self, task_group: TaskGroup, action: Callable[[], Awaitable[None]]) -> None:
        """The connection is idle from now: closed (`close`) unless a request comes first."""
        self.idle = True
        # The server is stopping: an idle connection closes at once.
        wait_s = 0.0 if self.terminated.is_set() else self.timeout_s
        deadline = trio.current_time() + wait_s
        if self._scope is None:
            self._scope = trio.CancelScope(deadline=deadline)
            task_group.spawn(self._run, action)
        else:
            self._scope.deadline = deadline

    async def stop(self) -> None:
        """A request is in progress: no deadline."""
        self.idle = False
        if self._scope is not None:
            self._scope.deadline = math.inf

    def finish(self) -> None:
        """The connection is read to its end: the timer closes it now, not at its deadline."""
        self._finished = True
        if self._scope is not None:
            self._scope.cancel()

    async def _run(self, close: Callable[[], Awaitable[None]]) -> None:
        while not self._finished:
            assert self._scope is not None
            with self._scope:
                await self.terminated.wait()
                if self.idle:
                    break
                await trio.sleep_forever()  # busy: `restart` after its response closes it
            if self._finished or (self.idle and trio.current_time() >= self._scope.deadline):
                break
            self._scope = trio.CancelScope(deadline=self._scope.deadline)
        with trio.CancelScope(shield=True):
            await close()


class LeanTCPServer(TCPServer):
    """hypercorn's connection handler with valrun's `IdleTimer`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle_timer = IdleTimer(self.config.keep_alive_timeout, self.context.terminated)
        self.idle_task = self.idle_timer  # hypercorn restarts and stops it

    async def _idle_timeout(self) -> None:
        await self._initiate_server_close()

    async def _read_data(self) -> None:
        """hypercorn's read loop, without the cancel scope it opens around every read for
        `read_timeout`, which valrun leaves unset: an idle connection has `IdleTimer`, a
        request's head `keep_alive_timeout`, a body `read_body`'s deadline. When the reading
        ends (the client closed, or the server did), so does the timer."""
        try:
            if self.config.read_timeout is not None:
                await super()._read_data()
                return
            while True:
                try:
                    data = await self.stream.receive_some(MAX_RECV)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    break
                await self.protocol.handle(RawData(bytes(data)))
                if not data:
                    break
            await self.protocol.handle(Closed())
        finally:
            # hypercorn's timer would go on until its deadline and hold the connection's
            # task (and its place in `server.max_connections`) that long.
            self.idle_timer.finish()


def raise_fd_limit(config: ServerConfig) -> int:
    """Raise the soft limit on open files to the hard one (a default soft limit of 1024
    would be exhausted by slow clients long before the connection caps act); warn when
    even that leaves too few for `max_connections`. The soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and config.max_connections + RESERVED_FDS > soft:
        logger.warning(
            "server.max_connections is %d but only %d files may be open (RLIMIT_NOFILE): "
            "raise the limit (LimitNOFILE= in the systemd unit) or lower the cap",
            config.max_connections,
            soft,
        )
    return soft


async def serve_app(
    app: ASGIFramework,
    hconfig: HypercornConfig,
    caps: ConnectionCaps,
    *,
    h2c: bool,
    shutdown_trigger: Callable[..., Awaitable[None]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """hypercorn's trio server around `app` (as `hypercorn.trio.serve`), with every
    listener counting its connections in `caps`; report the bound URLs."""
    wrapped = wrap_app(app, hconfig.wsgi_max_body_size, "asgi")
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(wrapped, hconfig, lifespan_state)
    context = WorkerContext(None)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            sockets = hconfig.create_sockets()
            listeners: list[trio.abc.Listener[trio.abc.Stream]] = []
            binds = []
            ssl_context = hconfig.create_ssl_context()
            for sock, secure in [(s, True) for s in sockets.secure_sockets] + [
                (s, False) for s in sockets.insecure_sockets
            ]:
                sock.listen(hconfig.backlog)
                capped = CappedListener(
                    trio.SocketListener(trio.socket.from_stdlib_socket(sock)),
                    caps,
                    refuse_h2c=not secure and not h2c,
                )
                if secure:
                    assert ssl_context is not None  # secure sockets come from TLS settings
                    listeners.append(trio.SSLListener(capped, ssl_context, https_compatible=True))
                else:
                    listeners.append(capped)
                scheme = "https" if secure else "http"
                binds.append(f"{scheme}://{repr_socket_addr(sock.family, sock.getsockname())}")
            task_status.started(binds)
            handler = partial(
                LeanTCPServer, wrapped, hconfig, context, ConnectionState(lifespan_state.copy())
            )
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(
                        partial(
                            trio.serve_listeners,
                            handler,
                            listeners,
                            handler_nursery=server_nursery,
                        )
                    )
                    await trio.sleep_forever()
            except BaseExceptionGroup as error:
                _, others = error.split(ShutdownError)
                if others is not None:
                    raise others from None
            finally:
                await context.terminated.set()
                server_nursery.cancel_scope.deadline = (
                    trio.current_time() + hconfig.graceful_timeout
                )
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
