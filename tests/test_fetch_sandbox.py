"""The worker's side of `std.fetch`, without a worker: its messages, its argument checks, the
response object a val gets; and the `[fetch]` config keys. Pure."""

from __future__ import annotations

from typing import Any

import pytest

from runtime.client import fetch_line
from runtime.config import FetchConfig, parse_config
from runtime.errors import ConfigError
from sandbox.facades import import_facade
from sandbox.fetch import FetchError, FetchResponse, make_fetch
from sandbox.http import Headers
from sandbox.messages import ASKS, FetchAsk, Fetched, MessageError, parse
from sandbox.wire import Frame, FrameDecoder, encode_frame


@pytest.mark.parametrize(
    "message",
    [
        FetchAsk(3, "POST", "https://a.example/x?y=1", (("x-a", "1"),), b"\0body", 2.5, False),
        FetchAsk(4, "GET", "http://b.example/"),
        Fetched(3, 200, "https://a.example/x", (("content-type", "text/plain"),), b"ok"),
        Fetched(4, error="blocked by the egress policy: ..."),
    ],
    ids=lambda m: type(m).__name__,
)
def test_fetch_messages_survive_their_frames(message: FetchAsk | Fetched) -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(message.to_frame()))
    frame = decoder.next_frame()
    assert frame is not None
    assert type(message).from_frame(frame) == message
    assert FetchAsk in ASKS


ASK = {"op": "fetch", "id": 1, "method": "GET", "url": "http://a/", "headers": []}
FETCHED = {"op": "fetched", "id": 1, "status": 200, "url": "http://a/", "headers": []}


@pytest.mark.parametrize(
    ("kind", "head"),
    [
        (FetchAsk, {**ASK, "timeout_s": -1}),
        (FetchAsk, {**ASK, "timeout_s": "5"}),
        (FetchAsk, {**ASK, "timeout_s": True}),
        (FetchAsk, {**ASK, "headers": [["a"]]}),
        (FetchAsk, {**ASK, "url": None}),
        (FetchAsk, {**ASK, "id": "1"}),
        (FetchAsk, {**ASK, "follow_redirects": 1}),
        (Fetched, {**FETCHED, "status": 0}),  # neither a response nor an error
        (Fetched, {**FETCHED, "error": "both"}),  # a response and an error
        (Fetched, {**FETCHED, "error": 3, "status": 0}),
    ],
)
def test_malformed_fetch_messages_are_refused(kind: Any, head: dict[str, object]) -> None:
    with pytest.raises(MessageError):
        parse(Frame(head), kind)


class FakeChannel:
    """Stands in for `Channel.ask`: records the ask, answers with `answer`."""

    def __init__(self, answer: Fetched) -> None:
        self.answer = answer
        self.asks: list[FetchAsk] = []

    def __call__(self, ask: Any, kind: Any, /) -> Any:
        self.asks.append(ask)
        assert kind is Fetched
        return self.answer


def test_fetch_sends_the_request_and_wraps_the_answer() -> None:
    channel = FakeChannel(
        Fetched(0, 201, "https://x.example/done", (("A", "1"), ("a", "2")), b"[1]")
    )
    fetch: Any = make_fetch(channel)["fetch"]
    response = fetch("https://x.example/", method="put", json={"k": "é"}, timeout_s=3)
    (ask,) = channel.asks
    assert (ask.method, ask.url, ask.timeout_s, ask.follow_redirects) == (
        "PUT",
        "https://x.example/",
        3.0,
        True,
    )
    assert ask.body == '{"k":"é"}'.encode()
    assert ("content-type", "application/json") in ask.headers
    assert (response.status, response.ok, response.url) == (201, True, "https://x.example/done")
    assert response.json() == [1]
    assert response.text() == "[1]"
    assert response.headers.getall("a") == ["1", "2"]
    assert response.headers.get("A") == "1, 2"


def test_a_refusal_is_a_fetch_error_with_the_front_ends_message() -> None:
    fetch: Any = make_fetch(FakeChannel(Fetched(0, error="timed out after 1 s")))["fetch"]
    with pytest.raises(FetchError, match="timed out after 1 s"):
        fetch("http://x.example/")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"url": b"http://x/"}, TypeError),
        ({"method": "GET /x"}, ValueError),
        ({"timeout_s": 0}, ValueError),
        ({"timeout_s": float("nan")}, ValueError),
        ({"timeout_s": True}, ValueError),
        ({"body": "a", "json": {}}, TypeError),
        ({"body": 3}, TypeError),
        ({"json": {1, 2}}, TypeError),
        ({"headers": [("a",)]}, TypeError),
        ({"follow_redirects": "yes"}, TypeError),
    ],
)
def test_bad_arguments_fail_in_the_worker(kwargs: dict[str, Any], error: type) -> None:
    channel = FakeChannel(Fetched(0, 200))
    fetch: Any = make_fetch(channel)["fetch"]
    url = kwargs.pop("url", "http://x.example/")
    with pytest.raises(error):
        fetch(url, **kwargs)
    assert channel.asks == []  # nothing was sent


def test_the_response_holds_plain_values_and_refuses_subclasses() -> None:
    response = FetchResponse(404, "http://x/", Headers([("a", "b")]), b"no")
    assert not response.ok
    assert response.status == 404
    with pytest.raises(AttributeError):
        response.status = 200
    with pytest.raises(TypeError, match="cannot be subclassed"):

        class Sub(FetchResponse):
            pass


@pytest.mark.parametrize("module", ["requests", "urllib.request", "http.client", "socket"])
def test_network_imports_are_refused_with_a_pointer_to_std_fetch(module: str) -> None:
    with pytest.raises(ImportError, match="from std import fetch"):
        import_facade(module)


def test_fetch_config_keys_and_their_checks() -> None:
    config = parse_config(
        {
            "fetch": {
                "enabled": True,
                "allow_networks": ["10.0.0.0/8"],
                "deny_hosts": "metadata.internal",
                "max_requests_per_invocation": 5,
                "max_response_bytes": 1024,
                "timeout_s": 2,
                "max_concurrent_per_user": 3,
            }
        }
    ).fetch
    assert config == FetchConfig(True, ("10.0.0.0/8",), ("metadata.internal",), 5, 1024, 2.0, 3)
    assert FetchConfig().max_response_bytes == 5 * 1024 * 1024
    for bad, message in [
        ({"timeout": 1}, "unknown key fetch.timeout"),
        ({"allow_networks": ["10.0.0.0/33"]}, "fetch.allow_networks"),
        ({"max_response_bytes": 64 * 1024 * 1024}, "fetch.max_response_bytes"),
        ({"max_concurrent_per_user": 0}, "fetch.max_concurrent_per_user must be positive"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_config({"fetch": bad})


def test_valrun_logs_prints_each_fetch_on_a_line() -> None:
    ok: dict[str, object] = {"method": "GET", "scheme": "https", "host": "a.example"}
    ok |= {"path": "/x", "status": 200, "bytes": 12, "ms": 3.5}
    refused: dict[str, object] = {"method": "GET", "scheme": "http", "host": "10.0.0.1"}
    refused |= {"path": "/", "error": "blocked by the egress policy: ...", "bytes": 0, "ms": 0.1}
    assert fetch_line(ok) == "fetch GET https://a.example/x -> 200 (12 B, 3.5 ms)"
    assert fetch_line(refused) == (
        "fetch GET http://10.0.0.1/ -> error: blocked by the egress policy: ... (0 B, 0.1 ms)"
    )
