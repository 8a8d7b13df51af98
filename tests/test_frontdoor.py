"""The front door (runtime.frontdoor, runtime.target): slow clients, connection caps,
cleartext HTTP/2 and absolute-form targets, tried as attacks on the real server over raw
sockets. Other loopback addresses (127.0.0.2, ...) stand for other clients."""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import h2.connection
import httpx
import pytest
import trio

from runtime.config import ServerConfig, parse_config
from runtime.errors import BadRequestError, ConfigError
from runtime.frontdoor import ConnectionCaps, raise_fd_limit
from runtime.target import origin_form
from tests.helpers import (
    HELLO,
    StartService,
    counter_code,
    raw_connect,
    raw_request,
    read_answer,
)
from tests.live import put_val, start_live

URL_VAL = (
    "def url(req):\n    return {'url': req.url, 'path': req.path, 'query': req.query.get('q')}\n"
)
H2C_UPGRADE = (
    "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
)


# --- pure parts ----------------------------------------------------------------------------


def test_server_keys_of_the_front_door_are_checked() -> None:
    config = parse_config({"server": {"max_connections": 10, "max_connections_per_address": 2}})
    assert (config.server.max_connections, config.server.h2c) == (10, False)
    for bad in (
        {"max_connections": 0},
        {"max_connections": 4, "max_connections_per_address": 5},
        {"body_timeout_s": 0},
        {"keep_alive_timeout_s": -1.0},
        {"h2c": "yes"},
    ):
        with pytest.raises(ConfigError, match=r"server\."):
            parse_config({"server": bad})


def test_connection_caps_count_per_address_and_in_all() -> None:
    caps = ConnectionCaps(total=3, per_address=2)
    assert caps.admit("a")
    assert caps.admit("a")
    assert not caps.admit("a")
    assert caps.admit("b")
    assert not caps.admit("c")
    caps.release("a")
    assert caps.admit("c")
    assert caps.by_address == {"a": 1, "b": 1, "c": 1}
    for address in ("a", "b", "c"):
        caps.release(address)
    assert caps.open == 0
    assert caps.by_address == {}
    assert caps.refused == 2


@pytest.mark.parametrize(
    ("target", "host", "expected"),
    [
        (b"/p", "h", b"/p"),
        (b"*", "h", b"*"),
        (b"http://h/p", "h", b"/p"),
        (b"http://H:80/p", "h", b"/p"),  # case and the default port do not make it another
        (b"https://h:443", "h:443", b"/"),
        (b"http://h:8080/a/b", "h:8080", b"/a/b"),
    ],
)
def test_an_absolute_target_naming_the_host_is_served_as_its_path(
    target: bytes, host: str, expected: bytes
) -> None:
    assert origin_form(target, host, "http") == expected


@pytest.mark.parametrize(
    ("target", "host"),
    [
        (b"http://other.example/p", "h"),
        (b"http://h:8081/p", "h:8080"),  # another port is another authority
        (b"http://h@other/p", "h"),
        (b"http://other@h/p", "h"),  # user information: refused whatever it names
        (b"ftp://h/p", "h"),
        (b"p", "h"),
        (b"http://h/p", None),  # no Host to compare with
    ],
)
def test_an_absolute_target_naming_another_authority_is_refused(
    target: bytes, host: str | None
) -> None:
    with pytest.raises(BadRequestError) as refused:
        origin_form(target, host, "http")
    assert refused.value.type == "bad_target"


# --- absolute-form targets against the real server -----------------------------------------


async def test_attack_absolute_target_for_another_host_is_400(start_service: StartService) -> None:
    service = await start_service()
    await service.put_val("url", URL_VAL)
    host = service.web_host("alice", "url")
    for target in (
        "http://other.example/path",
        f"http://bob-url.{service.config.server.web_domain}:{service.port}/",
        f"http://{service.api_host}/v1/me",
        f"http://{host}@other.example/",
        "path-without-slash",
    ):
        request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        with trio.fail_after(20):
            answer = await raw_request(service.port, request)
        assert answer is not None
        assert answer.status == 400, (target, answer)
        assert answer.json()["error"]["type"] == "bad_target"
    # The same authority keeps working, and the val sees a well-formed URL.
    for target in (f"http://{host}/p/q?q=1", f"HTTP://{host.upper()}/p/q?q=1"):
        request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        with trio.fail_after(20):
            answer = await raw_request(service.port, request)
        assert answer is not None
        assert answer.status == 200, answer
        assert answer.json() == {"url": f"http://{host}/p/q?q=1", "path": "/p/q", "query": "1"}


# --- slow clients --------------------------------------------------------------------------


async def test_attack_trickled_body_gets_408_and_the_connection_closes(
    start_service: StartService,
) -> None:
    service = await start_service(body_timeout_s=1.0)
    await service.put_val("hello", HELLO)
    stream = await raw_connect(service.port)
    head = f"POST / HTTP/1.1\r\nHost: {service.web_host('alice', 'hello')}\r\n"
    await stream.send_all(head.encode() + b"Content-Length: 1000\r\n\r\n")

    async def trickle() -> None:
        for _ in range(100):
            await trio.sleep(0.2)
            try:
                await stream.send_all(b"x")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        with trio.fail_after(15):
            answer = await read_answer(stream)
            assert answer is not None
            assert answer.status == 408
            assert answer.json()["error"]["type"] == "body_timeout"
            assert answer.headers["connection"] == "close"
            assert await stream.receive_some(100) == b""  # closed
        nursery.cancel_scope.cancel()
    await stream.aclose()
    assert (await service.web("alice", "hello")).status_code == 200


@pytest.mark.parametrize("sent", [b"", b"GET / HTTP/1.1\r\nHo", b"GET / HTT"])
async def test_attack_stalled_request_head_is_closed(
    start_service: StartService, sent: bytes
) -> None:
    service = await start_service(keep_alive_timeout_s=1.0)
    stream = await raw_connect(service.port)
    await stream.send_all(sent)
    with trio.fail_after(15):
        with contextlib.suppress(trio.BrokenResourceError):  # reset: closed too
            assert await stream.receive_some(100) == b""
    await stream.aclose()


SLEEPY = "import time\ndef sleepy(req):\n    time.sleep(1.5)\n    return 'slept'\n"


async def test_keep_alive_deadline_moves_with_each_request_and_a_long_one_is_not_cut(
    start_service: StartService,
) -> None:
    """runtime.frontdoor.IdleTimer: one timer per connection whose deadline moves. A
    connection asked again within the timeout stays open however long it lives, a request
    that runs longer than the timeout is answered, and once idle past it, it is closed."""
    service = await start_service(keep_alive_timeout_s=1.0)
    await service.put_val("hello", HELLO)
    await service.put_val("sleepy", SLEEPY)
    stream = await raw_connect(service.port)

    async def ask(val: str) -> int:
        host = service.web_host("alice", val)
        await stream.send_all(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        answer = await read_answer(stream)
        assert answer is not None, "the connection was closed"
        return answer.status

    with trio.fail_after(30):
        started = trio.current_time()
        while trio.current_time() - started < 2.5:  # 2.5 timeouts on one connection
            assert await ask("hello") == 200
            await trio.sleep(0.3)
        assert await ask("sleepy") == 200  # 1.5 s: longer than the timeout
        assert await ask("hello") == 200
        idle_since = trio.current_time()
        with contextlib.suppress(trio.BrokenResourceError):  # reset: closed too
            assert await stream.receive_some(100) == b""
        assert trio.current_time() - idle_since >= 0.9
    await stream.aclose()


async def test_a_connection_its_client_closed_gives_its_place_back_at_once(
    start_service: StartService,
) -> None:
    """Closed after its requests or before any, a connection's task and its place in the
    caps end when the close is read, not when the keep-alive timeout (here 60 s) would."""
    service = await start_service(keep_alive_timeout_s=60.0, max_connections_per_address=4)
    await service.put_val("hello", HELLO)
    host = service.web_host("alice", "hello")

    async def open_connections() -> int:
        health = (await service.api("GET", "/healthz", user=None)).json()
        return int(health["connections"]["open"])

    held = await open_connections()  # the test client's own
    with trio.fail_after(30):
        for _ in range(3):  # three rounds of four: the per-address cap would refuse a fifth
            streams = [await raw_connect(service.port, "127.0.3.1") for _ in range(4)]
            for stream in streams[:2]:  # two ask first; two close without a word
                await stream.send_all(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                answer = await read_answer(stream)
                assert answer is not None
                assert answer.status == 200
            for stream in streams:
                await stream.aclose()
            started = trio.current_time()
            while await open_connections() > held:
                await trio.sleep(0.05)
            assert trio.current_time() - started < 5


async def open_slow_clients(
    port: int, count: int, sources: list[str], host: str
) -> tuple[list[trio.SocketStream], int]:
    """`count` connections that each send part of a request and then stall: nothing, a
    partial head, or a head announcing a body that never comes. The open ones, and how
    many were reset before they were even connected (closed at accept, very quickly)."""
    partials = [b"", f"GET / HTTP/1.1\r\nHost: {host}\r\nX-Slow: ".encode()]
    partials.append(f"POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 99\r\n\r\nx".encode())
    streams, reset = [], 0
    for i in range(count):
        try:
            stream = await raw_connect(port, sources[i % len(sources)])
        except ConnectionResetError:
            reset += 1
            continue
        streams.append(stream)
        if partials[i % 3]:
            with contextlib.suppress(trio.BrokenResourceError):  # closed at accept already
                await stream.send_all(partials[i % 3])
    return streams, reset


async def closed_by_server(opened: tuple[list[trio.SocketStream], int], within_s: float) -> int:
    streams, closed = opened

    async def watch(stream: trio.SocketStream) -> None:
        nonlocal closed
        with trio.move_on_after(within_s):
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            closed += data == b""

    async with trio.open_nursery() as nursery:
        for stream in streams:
            nursery.start_soon(watch, stream)
    return closed


@pytest.mark.parametrize(
    ("addresses", "per_address"),
    [(["127.0.0.3"], 100), ([f"127.0.1.{i}" for i in range(1, 9)], 256)],
    ids=["one_address_over_its_cap", "eight_addresses_under_their_caps"],
)
async def test_attack_a_thousand_slow_clients_leave_the_service_answering(
    nursery: trio.Nursery, tmp_path: Path, addresses: list[str], per_address: int
) -> None:
    live = await start_live(
        nursery,
        tmp_path,
        server=(
            f"max_connections_per_address = {per_address}\n"
            "keep_alive_timeout_s = 60.0\nbody_timeout_s = 60.0"
        ),
    )
    async with httpx.AsyncClient(timeout=30) as client:
        await put_val(client, live, "counter", counter_code(1))
    host = f"alice-counter.web.localhost:{live.port}"
    opened = await open_slow_clients(live.port, 1000, addresses, host)
    slow = opened[0]
    try:
        # A normal client, from an address of its own, is answered at once meanwhile.
        for _ in range(3):
            with trio.fail_after(10):
                answer = await raw_request(
                    live.port, f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(), "127.0.0.2"
                )
            assert answer is not None
            assert answer.status == 200, answer
        closed = await closed_by_server(opened, within_s=3.0)
        over_cap = max(0, 1000 - per_address * len(addresses))
        assert closed == over_cap, (closed, over_cap)
    finally:
        for stream in slow:
            await stream.aclose()
    assert live.process.returncode is None
    live.process.terminate()
    with trio.fail_after(30):
        await live.process.wait()


async def test_attack_connections_over_the_total_cap_are_closed_and_the_service_lives(
    start_service: StartService,
) -> None:
    # A connection its client closed gives its place back as soon as the front end reads
    # the close (runtime.frontdoor.IdleTimer.finish).
    service = await start_service(
        max_connections=50, max_connections_per_address=50, keep_alive_timeout_s=10.0
    )
    host = service.web_host("alice", "hello")
    await service.put_val("hello", HELLO)
    health = (await service.api("GET", "/healthz", user=None)).json()
    held = health["connections"]["open"]  # the test client's own keep-alive connection
    assert held == 1
    opened = await open_slow_clients(service.port, 200, ["127.0.2.1", "127.0.2.2"], host)
    slow = opened[0]
    try:
        assert await closed_by_server(opened, within_s=3.0) == 200 - (50 - held)
        connections = (await service.api("GET", "/healthz", user=None)).json()["connections"]
        assert connections["open"] == 50
        assert connections["refused"] >= 150
    finally:
        for stream in slow:
            await stream.aclose()
    with trio.fail_after(40):  # their places are given back as they go
        while (await service.api("GET", "/healthz", user=None)).json()["connections"][
            "open"
        ] > held:
            await trio.sleep(0.05)
    answer = await raw_request(service.port, f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert answer is not None
    assert answer.status == 200


# --- cleartext HTTP/2 ----------------------------------------------------------------------


def h2_request(host: str) -> bytes:
    """The preface, settings and one GET on stream 1, as an HTTP/2 client with prior
    knowledge sends them."""
    connection = h2.connection.H2Connection()
    connection.initiate_connection()
    connection.send_headers(
        1,
        [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", host)],
        end_stream=True,
    )
    return connection.data_to_send()


@pytest.mark.parametrize("chunk", [None, 1, 7], ids=["whole", "byte_by_byte", "in_sevens"])
async def test_attack_http2_with_prior_knowledge_is_refused_and_runs_nothing(
    start_service: StartService, chunk: int | None
) -> None:
    service = await start_service()
    await service.put_val("counter", counter_code(1))
    host = service.web_host("alice", "counter")
    data = h2_request(host)
    stream = await raw_connect(service.port)
    with trio.fail_after(20):
        for start in range(0, len(data), chunk or len(data)):
            await stream.send_all(data[start : start + (chunk or len(data))])
        answer = await read_answer(stream)
    await stream.aclose()
    assert answer is not None
    assert answer.status == 400
    assert answer.json()["error"]["type"] == "h2c_refused"
    counted = await service.web("alice", "counter")
    assert counted.json()["count"] == 1  # the HTTP/2 request never reached the val


async def test_attack_h2c_upgrade_is_refused(start_service: StartService) -> None:
    service = await start_service()
    await service.put_val("hello", HELLO)
    request = H2C_UPGRADE.format(host=service.web_host("alice", "hello")).encode()
    with trio.fail_after(20):
        answer = await raw_request(service.port, request)
    assert answer is not None
    assert answer.status == 400
    assert answer.json()["error"]["type"] == "h2c_refused"
    assert (await service.web("alice", "hello")).status_code == 200


async def test_h2c_can_be_turned_on(start_service: StartService) -> None:
    service = await start_service(h2c=True)
    await service.put_val("hello", HELLO)
    request = H2C_UPGRADE.format(host=service.web_host("alice", "hello")).encode()
    stream = await raw_connect(service.port)
    with trio.fail_after(20):
        await stream.send_all(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
    await stream.aclose()
    assert data.startswith(b"HTTP/1.1 101 ")


SWITCH_HEAD = "HTTP/1.1 101 \r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n"


async def test_a_val_whose_body_looks_like_the_h2c_switch_is_served_as_it_is(
    start_service: StartService,
) -> None:
    service = await start_service()
    await service.put_val("fake", f"def fake(req):\n    return {SWITCH_HEAD.encode()!r}\n")
    host = service.web_host("alice", "fake")
    for extra in ("", "X-Note: upgrade: h2c\r\n"):
        with trio.fail_after(20):
            answer = await raw_request(
                service.port, f"GET / HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()
            )
        assert answer is not None
        assert (answer.status, answer.body) == (200, SWITCH_HEAD.encode())


def test_the_open_files_limit_is_raised_to_the_hard_one_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(512, hard), hard))
        few = ServerConfig(max_connections=100, max_connections_per_address=10)
        assert raise_fd_limit(few) == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
        assert "RLIMIT_NOFILE" not in caplog.text
        # More connections allowed than files may be open: said once, at start.
        too_many = ServerConfig(max_connections=hard, max_connections_per_address=1)
        raise_fd_limit(too_many)
        assert "server.max_connections" in caplog.text
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
