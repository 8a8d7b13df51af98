"""The lean request path (docs/design.md §7.2): work the front end skips per request does
not change what it answers. Pure parts, as tables, and the front door's writes."""

from __future__ import annotations

from typing import Any, cast

import pytest
import trio
from hypercorn.typing import ASGIReceiveEvent, HTTPScope

from runtime.accesslog import escape
from runtime.auth import parse_version
from runtime.errors import RequestTimeoutError
from runtime.frontdoor import (
    COALESCE_MAX_BYTES,
    ConnectionCaps,
    CountedStream,
    is_final_head,
)
from runtime.http import read_body

HEAD_200 = b"HTTP/1.1 200 \r\ncontent-type: application/json\r\ncontent-length: 5\r\n\r\n"
HEAD_404 = b"HTTP/1.0 404 \r\ncontent-length: 0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 \r\n\r\n"
SWITCH = b"HTTP/1.1 101 \r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n"
EOF_MARK = b"<eof>"
BIG = b"x" * (COALESCE_MAX_BYTES + 1)

# --- the access line's escaping ------------------------------------------------------------

#: What the access line must never write raw: C0, DEL and C1 controls, the line and
#: paragraph separators, the bidirectional marks, embeddings, overrides and isolates, and
#: the backslash.
UNSAFE = {
    *range(0x00, 0x20),
    *range(0x7F, 0xA0),
    0x5C,
    0x2028,
    0x2029,
    0x200E,
    0x200F,
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
}


def test_escape_rewrites_exactly_the_unsafe_characters() -> None:
    for code in [*range(0x3000), *range(0xFE00, 0x10000), 0x1F600, 0xE0001]:
        if 0xD800 <= code < 0xE000:
            continue
        text = f"a{chr(code)}b"
        if code in UNSAFE:
            assert escape(text) != text, hex(code)
            assert escape(text).isascii(), hex(code)
        else:
            assert escape(text) == text, hex(code)


@pytest.mark.parametrize(
    ("text", "escaped"),
    [
        ("bench-hello.web.localhost", "bench-hello.web.localhost"),
        ("/caf\u00e9 r\u00e9sum\u00e9", "/caf\u00e9 r\u00e9sum\u00e9"),
        ("a\u2028b", "a\\u2028b"),
        ("\u202egnp.exe", "\\u202egnp.exe"),
        ("a\x85b\x7f", "a\\x85b\\x7f"),
        ("a\\x0a", "a\\x5cx0a"),
    ],
)
def test_escape_table(text: str, escaped: str) -> None:
    assert escape(text) == escaped


# --- ?v= on a web host -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "version"), [("", None), ("v=3", 3), ("name=x&v=12", 12), ("name=v", None)]
)
def test_version_is_read_from_the_query_only_when_there_is_one(
    query: str, version: int | None
) -> None:
    assert parse_version(query) == version


# --- the body's deadline -----------------------------------------------------------------------


def _scope(http_version: str, headers: list[tuple[bytes, bytes]]) -> HTTPScope:
    return cast(HTTPScope, {"type": "http", "http_version": http_version, "headers": headers})


def _receive(*bodies: bytes) -> Any:
    messages = [
        {"type": "http.request", "body": body, "more_body": i < len(bodies) - 1}
        for i, body in enumerate(bodies)
    ]

    async def receive() -> ASGIReceiveEvent:
        await trio.lowlevel.checkpoint()
        return cast(ASGIReceiveEvent, messages.pop(0))

    return receive


@pytest.mark.parametrize("http_version", ["1.0", "1.1"])
async def test_a_request_without_a_body_is_read_without_a_deadline(http_version: str) -> None:
    # A deadline of 0 would refuse any wait: none is taken for a request that has no body.
    scope = _scope(http_version, [(b"host", b"a.localhost")])
    assert await read_body(scope, _receive(b""), 100, timeout_s=0) == b""


@pytest.mark.parametrize(
    ("http_version", "headers"),
    [
        ("1.1", [(b"content-length", b"2")]),
        ("1.1", [(b"Transfer-Encoding", b"chunked")]),
        # HTTP/2 frames a body without either header: it keeps its deadline.
        ("2", []),
    ],
)
async def test_a_request_that_may_have_a_body_keeps_its_deadline(
    http_version: str, headers: list[tuple[bytes, bytes]]
) -> None:
    with pytest.raises(RequestTimeoutError):
        await read_body(_scope(http_version, headers), _receive(b"h", b"i"), 100, timeout_s=0)
    assert await read_body(_scope(http_version, headers), _receive(b"h", b"i"), 100) == b"hi"


# --- one send per response -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "final"),
    [
        (HEAD_200, True),
        (HEAD_404, True),
        (CONTINUE, False),
        (SWITCH, False),
        (b"HTTP/1.1 200 \r\ncontent-length: 5\r\n", False),  # not a whole head
        (b"hello", False),
        (b"", False),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", False),
    ],
)
def test_only_a_whole_final_response_head_is_held(data: bytes, final: bool) -> None:
    assert is_final_head(data) is final
    assert is_final_head(memoryview(data)) is final


class SentLog:
    """Stands for the accepted socket: what each write sent."""

    socket = None

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent.append(bytes(data))

    async def send_eof(self) -> None:
        self.sent.append(EOF_MARK)

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize(
    ("writes", "sent"),
    [
        # Content-Length: the head goes with the body; the empty end is written as before.
        ([HEAD_200, b"hello", b""], [HEAD_200 + b"hello", b""]),
        # HEAD, 204, 304: no body, the empty end takes the head.
        ([HEAD_404, b""], [HEAD_404]),
        # Chunked: the head goes with the first chunk.
        ([HEAD_200, b"5\r\nhello\r\n", b"0\r\n\r\n"], [HEAD_200 + b"5\r\nhello\r\n", b"0\r\n\r\n"]),
        # A body that looks like a head is sent with the head before it, never held.
        ([HEAD_200, HEAD_404, b""], [HEAD_200 + HEAD_404, b""]),
        # A large body is not copied to join its head: two sends, as hypercorn writes them.
        ([HEAD_200, BIG, b""], [HEAD_200, BIG, b""]),
        # Interim responses leave at once: the client waits for them.
        ([CONTINUE, HEAD_200, b"hello", b""], [CONTINUE, HEAD_200 + b"hello", b""]),
        # Two responses on one connection: each head leaves with its own response's bytes.
        (
            [HEAD_404, b"", HEAD_200, b"hello", b""],
            [HEAD_404, HEAD_200 + b"hello", b""],
        ),
    ],
)
async def test_a_response_head_leaves_with_the_write_after_it(
    writes: list[bytes], sent: list[bytes]
) -> None:
    inner = SentLog()
    caps = ConnectionCaps(10, 10)
    assert caps.admit("127.0.0.1")
    stream = CountedStream(cast(trio.SocketStream, inner), caps, "127.0.0.1", refuse_h2c=False)
    for data in writes:
        await stream.send_all(memoryview(data))
    assert inner.sent == sent
    await stream.send_eof()
    assert inner.sent == [*sent, EOF_MARK]
    await stream.aclose()
    assert caps.open == 0


async def test_a_held_head_is_sent_before_the_end_of_the_connection() -> None:
    inner = SentLog()
    caps = ConnectionCaps(10, 10)
    assert caps.admit("127.0.0.1")
    stream = CountedStream(cast(trio.SocketStream, inner), caps, "127.0.0.1", refuse_h2c=False)
    await stream.send_all(HEAD_404)
    assert inner.sent == []
    await stream.send_eof()
    assert inner.sent == [HEAD_404, EOF_MARK]
