"""httpx connections that go only where the egress policy allows: resolved, checked, pinned.

httpx hands every new connection to httpcore, and httpcore asks its network backend to
`connect_tcp(host, port)`. `EgressBackend` is that backend: it resolves `host` once, checks
every address the name resolves to (`runtime.egress.check_address`), and connects to the
checked address itself. TLS is then started on that connection by httpcore with the URL's
host name as SNI and as the name the certificate must match, and httpx sends the URL's host
in the Host header, so nothing about the request changes except that no second lookup
happens between the check and the connection: DNS rebinding has nothing to swap.

httpx's own `AsyncHTTPTransport` has no way to pass a network backend, so `EgressTransport`
is the same thin layer over `httpcore.AsyncConnectionPool` with this backend. It maps no
exceptions: `runtime.fetch` turns httpcore's into what the val is told.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable

import httpcore
import httpx
import trio

from runtime.egress import EgressPolicy, IPAddress, check_address

SocketOption = (
    tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
)


class ResolveError(Exception):
    """A host name that does not resolve (the message says why)."""


async def resolve(host: str, port: int) -> list[IPAddress]:
    """The addresses `host` resolves to, in the resolver's order, without repeats."""
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ResolveError(f"DNS lookup of {host!r} failed: {exc.strerror}") from None
    except (UnicodeError, OSError) as exc:  # a name the resolver cannot even encode
        raise ResolveError(f"DNS lookup of {host!r} failed: {exc}") from None
    addresses: dict[IPAddress, None] = {}
    for _family, _type, _proto, _name, sockaddr in infos:
        addresses[ipaddress.ip_address(sockaddr[0])] = None
    if not addresses:
        raise ResolveError(f"DNS lookup of {host!r} found no addresses")
    return list(addresses)


Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]


class EgressBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, policy: EgressPolicy, resolver: Resolver = resolve) -> None:
        self.policy = policy
        self.resolve = resolver
        self._trio = httpcore.TrioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's backend interface)
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self.resolve(host, port)  # the one lookup for this connection
        # Every address, not just the first: a name that resolves to a public address and
        # a private one would otherwise reach the private one whenever the first is down.
        for address in addresses:
            check_address(host, address, self.policy, resolved=host != str(address))
        failure: httpcore.ConnectError | None = None
        for address in addresses:
            try:
                return await self._trio.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except httpcore.ConnectError as exc:
                failure = exc
        assert failure is not None  # `resolve` returns at least one address
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's backend interface)
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("vals cannot reach Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


class _ResponseStream(httpx.AsyncByteStream):
    """httpcore's response stream as httpx's (httpx's own wrapper is private)."""

    def __init__(self, stream: Iterable[bytes] | AsyncIterable[bytes]) -> None:
        if not isinstance(stream, AsyncIterable):
            raise TypeError("an async connection pool gave a synchronous stream")
        self._stream = stream

    def __aiter__(self) -> AsyncIterator[bytes]:
        # The stream's own iterator, not a generator of ours around it: one left unfinished
        # (a body over the cap) would otherwise be closed only by the garbage collector.
        return aiter(self._stream)

    async def aclose(self) -> None:
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            await close()


class EgressTransport(httpx.AsyncBaseTransport):
    """An httpx transport whose every connection went through `EgressBackend`."""

    def __init__(
        self,
        policy: EgressPolicy,
        *,
        resolver: Resolver = resolve,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 100,
        keepalive_expiry_s: float = 30,
    ) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context or httpx.create_ssl_context(trust_env=False),
            max_connections=max_connections,
            max_keepalive_connections=max_connections // 5 or 1,
            keepalive_expiry=keepalive_expiry_s,
            network_backend=EgressBackend(policy, resolver),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        response = await self._pool.handle_async_request(core_request)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()
