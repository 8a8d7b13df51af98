"""The front end's side of `std.fetch`: make a val's HTTP request, under policy and limits.

`Fetcher.answer` is the broker's handler for `FetchAsk` (`runtime.broker`). For each fetch it
checks the request (method, headers, URL against the egress policy of `runtime.egress`),
takes one of the owner's `max_concurrent_per_user` slots, sends the request with one httpx
client shared by all invocations (its connections are pooled; `runtime.pinned` makes every
connection go to a checked address), follows redirects itself, one checked hop at a time,
reads the body up to `max_response_bytes`, and answers with `Fetched`: the response, or the
message of the `FetchError` the val gets.

Time: each fetch has `timeout_s` (the val may ask for less). The broker runs inside the
invocation's wall-time scope, so a fetch is cancelled when the val's time is up, whatever
its own timeout, and its time counts against the val's.

Per invocation: `fetch_log()` (entered by `runtime.invoke` around each invocation, through a
context variable, because the broker's handlers see only the val and the ask) counts the
fetches against `max_requests_per_invocation` and lists them for the invocation's record.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import cast

import httpcore
import httpx
import trio

from runtime.config import FetchConfig
from runtime.egress import BadURLError, EgressError, check_url
from runtime.masking import mask_secrets
from runtime.pinned import EgressTransport, ResolveError
from runtime.pool import ValSpec
from sandbox.messages import FetchAsk, Fetched

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 5
MAX_REQUEST_HEADERS = 100
MAX_REQUEST_HEADER_BYTES = 64 * 1024
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Framing and hop-by-hop headers belong to the HTTP client; a val's value would desynchronize
# the connection or pick the server behind it (Host).
CLIENT_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
    }
)
# Credentials a redirect to another origin must not carry (as browsers and httpx do).
CREDENTIAL_HEADERS = frozenset({"authorization", "cookie"})
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2
_FIELD_VALUE_RE = re.compile(r"[\x20-\x7e\x80-\xff\t]*")  # no CR, LF, NUL or other controls

try:
    VERSION = importlib.metadata.version("valrun")
except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
    VERSION = "dev"


class FetchProblem(Exception):
    """Why a fetch gives the val a FetchError: `outcome` labels it in records and metrics."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message


@dataclass
class FetchLog:
    """The fetches of one invocation: how many were asked for, and their record entries."""

    count: int = 0
    entries: list[dict[str, object]] = field(default_factory=list)
    #: The entry of the first fetch refused for the per-invocation limit; later refusals
    #: only count on it (`"repeated"`), so a val looping on the refusal cannot grow its record.
    refused: dict[str, object] | None = None


_current_log: ContextVar[FetchLog | None] = ContextVar("valrun_fetch_log", default=None)


@contextmanager
def fetch_log() -> Iterator[FetchLog]:
    """The FetchLog of the invocation run inside this block."""
    log = FetchLog()
    token = _current_log.set(log)
    try:
        yield log
    finally:
        _current_log.reset(token)


def user_agent(spec: ValSpec) -> str:
    who = f"{spec.owner}/{spec.name}" if spec.owner else spec.name
    return f"valrun/{VERSION} (+{who})"


class Fetcher:
    def __init__(
        self, config: FetchConfig, client: httpx.AsyncClient, outcomes: Counter[str] | None = None
    ) -> None:
        self.config = config
        self.policy = config.policy()
        self.client = client
        #: Finished fetches by outcome ("ok", "blocked", "timeout", ...), for /metrics.
        self.outcomes: Counter[str] = Counter() if outcomes is None else outcomes
        self._slots: dict[str, trio.CapacityLimiter] = {}

    async def answer(self, spec: ValSpec, ask: FetchAsk) -> Fetched:
        # `runtime.invoke` enters a log for every invocation; a pool driven directly (tests)
        # gets one per fetch.
        log = _current_log.get() or FetchLog()
        started = trio.current_time()
        entry: dict[str, object] = {"method": ask.method, **_where(ask.url)}
        outcome, answer = "cancelled", Fetched(ask.id, error="cancelled")
        try:
            response, body = await self._fetch(spec, ask, log)
            headers = tuple(response.headers.multi_items())
            answer = Fetched(ask.id, response.status_code, str(response.url), headers, body)
            outcome = "ok"
            entry.update(status=response.status_code, bytes=len(body))
        except FetchProblem as problem:
            outcome, answer = problem.outcome, Fetched(ask.id, error=problem.message)
            entry.update(error=mask_secrets(problem.message, spec.env), bytes=0)
        finally:
            entry["ms"] = round((trio.current_time() - started) * 1000, 3)
            if outcome == "cancelled":
                entry.update(error="cancelled: the val's wall time ran out", bytes=0)
            for key, value in entry.items():  # a val may put an env value anywhere
                if isinstance(value, str):
                    entry[key] = mask_secrets(value, spec.env)
            self.outcomes[outcome] += 1
            if outcome != "limit":
                log.entries.append(entry)
            elif log.refused is None:
                log.refused = entry
                log.entries.append(entry)
            else:
                log.refused["repeated"] = cast(int, log.refused.get("repeated", 0)) + 1
        return answer

    async def _fetch(
        self, spec: ValSpec, ask: FetchAsk, log: FetchLog
    ) -> tuple[httpx.Response, bytes]:
        config = self.config
        if not config.enabled:
            raise FetchProblem(
                "disabled", "outbound HTTP is turned off on this valrun ([fetch] enabled = false)"
            )
        if log.count >= config.max_requests_per_invocation:
            raise FetchProblem(
                "limit",
                f"too many requests in one invocation: the limit is "
                f"{config.max_requests_per_invocation} fetches; fetch less per request, "
                "or batch what you need into fewer calls",
            )
        log.count += 1
        headers = _request_headers(ask, spec)
        timeout_s = min(ask.timeout_s or config.timeout_s, config.timeout_s)
        slotted = False
        with trio.move_on_after(timeout_s):
            async with self._slot(spec.owner):
                slotted = True
                return await self._follow(ask, headers)
        if not slotted:
            raise FetchProblem(
                "timeout",
                f"timed out after {timeout_s:g} s waiting for a free slot: "
                f"{config.max_concurrent_per_user} fetches of {spec.owner or 'anonymous'}'s "
                "vals were in flight ([fetch] max_concurrent_per_user); retry later",
            )
        raise FetchProblem(
            "timeout",
            f"timed out after {timeout_s:g} s: the server did not answer in time (a fetch "
            f"may take up to {config.timeout_s:g} s here; timeout_s= chooses less)",
        )

    @asynccontextmanager
    async def _slot(self, owner: str) -> AsyncIterator[None]:
        """One of `owner`'s concurrent-fetch slots; waits while all are taken."""
        limiter = self._slots.get(owner)
        if limiter is None:
            limiter = self._slots[owner] = trio.CapacityLimiter(self.config.max_concurrent_per_user)
        try:
            async with limiter:
                yield
        finally:
            if limiter.borrowed_tokens == 0 and limiter.statistics().tasks_waiting == 0:
                self._slots.pop(owner, None)

    async def _follow(
        self, ask: FetchAsk, headers: list[tuple[str, str]]
    ) -> tuple[httpx.Response, bytes]:
        method, url, body = ask.method, ask.url, ask.body
        for hop in range(MAX_REDIRECTS + 1):
            try:
                check_url(url, self.policy)
            except EgressError as exc:
                raise FetchProblem("blocked", _hop(hop) + str(exc)) from None
            except BadURLError as exc:
                raise FetchProblem("bad_request", _hop(hop) + str(exc)) from None
            request = self.client.build_request(method, url, headers=headers, content=body)
            try:
                response = await _send(self.client, request)
            except FetchProblem as problem:
                raise FetchProblem(problem.outcome, _hop(hop) + problem.message) from None
            try:
                location = response.headers.get("location")
                if not (
                    ask.follow_redirects
                    and response.status_code in REDIRECT_STATUSES
                    and location is not None
                ):
                    return response, await self._read(response)
                if hop == MAX_REDIRECTS:
                    raise FetchProblem(
                        "too_many_redirects",
                        f"more than {MAX_REDIRECTS} redirects, the last to {_shown(location)}; "
                        "pass follow_redirects=False to see each response",
                    )
                try:
                    next_url = request.url.join(location)
                except httpx.InvalidURL as exc:
                    raise FetchProblem(
                        "bad_response", f"the server redirected to an invalid URL: {exc}"
                    ) from None
            finally:
                await response.aclose()
            # RFC 9110 §15.4: 303 becomes GET; so do 301/302 after a POST, as every browser
            # does. 307 and 308 repeat the request as it was.
            if response.status_code == 303 or (
                response.status_code in (301, 302) and method == "POST"
            ):
                method, body = ("HEAD" if method == "HEAD" else "GET"), b""
                headers = [(k, v) for k, v in headers if k.lower() != "content-type"]
            if next_url.scheme != request.url.scheme or next_url.netloc != request.url.netloc:
                headers = [(k, v) for k, v in headers if k.lower() not in CREDENTIAL_HEADERS]
            url = str(next_url)
        raise AssertionError("unreachable: the loop returns or raises")

    async def _read(self, response: httpx.Response) -> bytes:
        cap = self.config.max_response_bytes
        too_large = FetchProblem(
            "too_large",
            f"the response is over {cap} bytes, the most a fetch may receive "
            "([fetch] max_response_bytes); ask the server for less (a range, a page)",
        )
        length = response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            raise too_large
        chunks, size = [], 0
        try:
            # Raw: the body as sent, never decompressed here (a small gzip bomb would
            # decompress to gigabytes before any cap could look at it).
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > cap:
                    raise too_large
                chunks.append(chunk)
        except (httpcore.NetworkError, httpcore.ProtocolError) as exc:
            raise FetchProblem(
                "connection", f"the connection broke while reading the response: {exc}"
            ) from None
        return b"".join(chunks)


async def _send(client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
    """Send one request; every failure as the FetchProblem that explains it."""
    host = request.url.host
    try:
        return await client.send(request, stream=True)
    except EgressError as exc:
        raise FetchProblem("blocked", str(exc)) from None
    except ResolveError as exc:
        raise FetchProblem("dns", f"{exc}; check the host name") from None
    except httpcore.ConnectError as exc:
        tls = tls_error(exc)
        if tls is not None:
            raise FetchProblem(
                "tls",
                f"TLS with {host!r} failed: {tls.reason or tls} (the server must speak TLS "
                "on this port, with a certificate valid for its name)",
            ) from None
        raise FetchProblem(
            "connect",
            f"could not connect to {host!r} on port {request.url.port or 'default'}: "
            f"{exc or 'connection refused'}",
        ) from None
    except (httpcore.NetworkError, httpcore.ProtocolError) as exc:
        raise FetchProblem("connection", f"the request to {host!r} failed: {exc}") from None
    except httpcore.UnsupportedProtocol as exc:
        raise FetchProblem("bad_request", str(exc)) from None


def tls_error(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind a failed connection (trio and httpcore each wrap it once)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None or isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _request_headers(ask: FetchAsk, spec: ValSpec) -> list[tuple[str, str]]:
    if not _TOKEN_RE.fullmatch(ask.method):
        raise FetchProblem("bad_request", f"{ask.method[:40]!r} is not an HTTP method")
    if len(ask.headers) > MAX_REQUEST_HEADERS:
        raise FetchProblem("bad_request", f"more than {MAX_REQUEST_HEADERS} request headers")
    if sum(len(k) + len(v) for k, v in ask.headers) > MAX_REQUEST_HEADER_BYTES:
        raise FetchProblem(
            "bad_request", f"the request headers are over {MAX_REQUEST_HEADER_BYTES} bytes"
        )
    headers: list[tuple[str, str]] = []
    agent = user_agent(spec)
    for name, value in ask.headers:
        lower = name.lower()
        if not _TOKEN_RE.fullmatch(name) or not _FIELD_VALUE_RE.fullmatch(value):
            raise FetchProblem(
                "bad_request",
                f"request header {name[:40]!r} is not a valid header (a token name, and a "
                "value without control characters)",
            )
        if lower in CLIENT_HEADERS:
            raise FetchProblem(
                "bad_request", f"the {name} header is set by valrun's HTTP client; leave it out"
            )
        if lower == "user-agent":
            # The val may name itself; valrun's name stays, so the site can tell who called.
            agent = f"{value} {agent}"
            continue
        headers.append((name, value))
    headers.append(("user-agent", agent))
    if not any(name.lower() == "accept-encoding" for name, _ in headers):
        headers.append(("accept-encoding", "identity"))
    return headers


def _where(url: str) -> dict[str, object]:
    """The record's view of a URL: scheme, host and path; never the query."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return {"scheme": "", "host": "", "path": ""}
    return {"scheme": parsed.scheme, "host": parsed.host, "path": parsed.path}


def _hop(hop: int) -> str:
    return "" if hop == 0 else f"redirect {hop}: "


def _shown(url: str) -> str:
    return repr(url.partition("?")[0][:200])


@asynccontextmanager
async def open_fetcher(
    config: FetchConfig, outcomes: Counter[str] | None = None
) -> AsyncIterator[Fetcher]:
    """A Fetcher with its client, counting into `outcomes`; the client's pooled connections
    close on exit."""
    transport = EgressTransport(config.policy())
    # trust_env=False: proxies and certificate files named in the service's environment
    # do not apply to vals' requests. Redirects are followed by `Fetcher`, hop by hop.
    async with httpx.AsyncClient(
        transport=transport, trust_env=False, follow_redirects=False, timeout=None
    ) as client:
        yield Fetcher(config, client, outcomes)
