"""`std.fetch`: outbound HTTP for vals, made by the front end on the val's behalf.

The worker has no network (its namespace has none, and seccomp refuses new sockets). `fetch`
checks its arguments here, sends a `FetchAsk` over the worker's socket and blocks until the
front end answers with the response or a refusal (`runtime.fetch`, under the egress policy of
`runtime.egress`). Every refusal and failure reaches the val as a `FetchError` whose message
says what happened and what to do.

`FetchResponse` is handed to untrusted code, so it follows `sandbox.http`'s rules: underscore
slots, plain values only, no subclasses. Standard library only: this runs inside the worker.
"""

from __future__ import annotations

import json as _json
import re
from typing import Protocol

from sandbox.http import JSON_TYPE, TEXT_TYPE, HeaderInput, Headers, _exact_str, _header_pairs
from sandbox.messages import Ask, FetchAsk, Fetched, M

_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2


# The Fetch standard upper-cases these methods however they are written; others are sent as
# they are (methods are case-sensitive, RFC 9110 §9.1).
_NORMALIZED_METHODS = frozenset({"DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"})


def _normalized(method: str) -> str:
    upper = method.upper()
    return upper if upper in _NORMALIZED_METHODS else method


class FetchError(Exception):
    """A fetch that was refused (egress policy, limits) or failed (DNS, TLS, timeout)."""


class _Asker(Protocol):
    def __call__(self, ask: Ask, answer: type[M], /) -> M: ...


class FetchResponse:
    """What `fetch` returns: `status`, `ok`, `url` (after redirects), `headers`, `body`,
    `text()`, `json()`."""

    __slots__ = ("_body", "_headers", "_status", "_url")

    def __init_subclass__(cls, **kwargs: object) -> None:
        raise TypeError("FetchResponse cannot be subclassed")

    def __init__(self, status: int, url: str, headers: Headers, body: bytes) -> None:
        self._status = status
        self._url = url
        self._headers = headers
        self._body = body

    status = property(lambda self: self._status)
    ok = property(lambda self: 200 <= self._status <= 299)
    url = property(lambda self: self._url)
    headers = property(lambda self: self._headers)
    body = property(lambda self: self._body)

    def text(self) -> str:
        return self._body.decode("utf-8", errors="replace")

    def json(self) -> object:
        return _json.loads(self._body)

    def __repr__(self) -> str:
        return f"<FetchResponse {self._status} {self._url}, {len(self._body)} bytes>"


def _request_body(
    body: object, json: object, pairs: tuple[tuple[str, str], ...]
) -> tuple[bytes, tuple[tuple[str, str], ...]]:
    has_type = any(name.lower() == "content-type" for name, _ in pairs)
    if json is not None:
        if body is not None:
            raise TypeError("fetch takes body= or json=, not both")
        try:
            data = _json.dumps(json, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"fetch json= is not JSON: {exc}") from None
        encoded = data.encode("utf-8", errors="backslashreplace")
        return encoded, pairs if has_type else (*pairs, ("content-type", JSON_TYPE))
    if body is None:
        return b"", pairs
    if isinstance(body, str):
        encoded = str.encode(_exact_str(body), "utf-8", errors="backslashreplace")
        return encoded, pairs if has_type else (*pairs, ("content-type", TEXT_TYPE))
    if isinstance(body, bytes | bytearray):
        return bytes(body), pairs
    raise TypeError(f"fetch body= must be str or bytes, not {type(body).__name__}")


def make_fetch(ask: _Asker) -> dict[str, object]:
    """The `std` members for outbound HTTP, asking through `ask` (`Channel.ask`)."""

    def fetch(
        url: str,
        *,
        method: str = "GET",
        headers: HeaderInput = None,
        body: str | bytes | None = None,
        json: object = None,
        timeout_s: float | None = None,
        follow_redirects: bool = True,
    ) -> FetchResponse:
        """Make an HTTP request through valrun; a FetchResponse, or FetchError."""
        if not isinstance(url, str):
            raise TypeError(f"fetch url must be a str, not {type(url).__name__}")
        if not isinstance(method, str) or not _TOKEN_RE.fullmatch(method):
            raise ValueError(f"fetch method {method!r} is not an HTTP method name")
        if timeout_s is not None and (
            type(timeout_s) not in (int, float) or not 0 < timeout_s < float("inf")
        ):
            raise ValueError(f"fetch timeout_s must be a positive number, not {timeout_s!r}")
        if type(follow_redirects) is not bool:
            raise TypeError("fetch follow_redirects must be True or False")
        data, pairs = _request_body(body, json, _header_pairs(headers))
        request = FetchAsk(
            id=0,  # the channel stamps the invocation's id
            method=_normalized(_exact_str(method)),
            url=_exact_str(url),
            headers=pairs,
            body=data,
            timeout_s=None if timeout_s is None else float(timeout_s),
            follow_redirects=follow_redirects,
        )
        answer = ask(request, Fetched)
        if answer.error is not None:
            raise FetchError(answer.error)
        return FetchResponse(answer.status, answer.url, Headers(answer.headers), answer.body)

    return {"fetch": fetch, "FetchError": FetchError}
