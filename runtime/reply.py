"""Validation of what a worker sends back. Pure.

A worker is hostile, as h11 treats its peer. `sandbox.messages` checks that a reply is a
well-formed message of the kind due (types, allowed values); this module then applies the
front end's policy to it (the configured limits, header syntax, framing headers, cookie
domains) before any of it becomes a response. A reply that breaks a rule is the worker's
fault: the caller gets 502 and the worker is killed, never reused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from runtime import strictjson
from runtime.config import LimitsConfig
from runtime.errors import WorkerError
from sandbox.limits import WorkerLimits
from sandbox.messages import (
    REPLY_TO,
    Failure,
    HeaderPairs,
    HttpResponse,
    Invocation,
    MessageError,
    Result,
    ValueRefusedError,
    parse,
)
from sandbox.wire import Frame

# RFC 9110 §5.1: a field name is a token.
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 §5.5: field values are visible ASCII, obs-text, and SP/HTAB inside. No CR, LF,
# NUL or other controls: those split a header in two (response splitting).
_FIELD_VALUE_RE = re.compile(
    rb"[\x21-\x7e\x80-\xff]([\x20\x09\x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?"
)

# Framing and hop-by-hop headers belong to the server: the front end computes them, and a
# val's value (a wrong Content-Length, a Transfer-Encoding) would desynchronize the
# connection. They are dropped, not refused, because setting Content-Length right is common.
FRONT_END_HEADERS = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"upgrade",
        b"te",
        b"trailer",
        b"proxy-connection",
        b"date",
        b"server",
    }
)

MAX_MESSAGE_CHARS = 4096
MAX_TRACEBACK_LINES = 64


@dataclass(frozen=True, slots=True)
class ValResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    log: str


@dataclass(frozen=True, slots=True)
class ValResult:
    """A Run or Eval result: `body` is checked to be UTF-8 JSON, forwarded as it is."""

    body: bytes
    log: str


@dataclass(frozen=True, slots=True)
class Reply:
    """A checked reply: a response, a result, or the val's failure; `retire` if the worker is
    done."""

    outcome: ValResponse | ValResult | WorkerError
    log: str
    retire: bool


def protocol_error(what: str) -> WorkerError:
    return WorkerError(f"the worker broke the protocol: {what}", "protocol_error")


def bounded_log(raw: str, limits: WorkerLimits) -> str:
    encoded = raw.encode("utf-8", errors="replace")
    # The worker caps the log and appends its own marker; the slack lets that through.
    if len(encoded) <= limits.max_log_bytes + 64:
        return encoded.decode("utf-8")
    cut = encoded[: limits.max_log_bytes]
    return (
        cut.decode("utf-8", errors="ignore") + f"\n[log truncated at {limits.max_log_bytes} bytes]"
    )


def _cookie_domains(value: bytes) -> list[bytes]:
    # Every Domain attribute, not just the first: browsers use the last one (RFC 6265
    # §5.3 step 4), so `Domain=own; Domain=wider` must not pass as `own`.
    domains = []
    for attribute in value.split(b";")[1:]:
        name, _, domain = attribute.partition(b"=")
        if name.strip().lower() == b"domain":
            domains.append(domain.strip().lstrip(b".").lower())
    return domains


def clean_text(text: str) -> str:
    """A worker's string, safe to re-encode: JSON lets it smuggle in lone surrogates."""
    return text.encode("utf-8", errors="replace").decode("utf-8")


def check_headers(raw: HeaderPairs, limits: LimitsConfig, host: str) -> list[tuple[bytes, bytes]]:
    if len(raw) > limits.max_response_headers:
        raise WorkerError(
            f"the val set {len(raw)} headers; the limit is {limits.max_response_headers}",
            "bad_response",
        )
    own_host = host.encode()
    headers: list[tuple[bytes, bytes]] = []
    total = 0
    for pair in raw:
        try:
            name, value = pair[0].encode("ascii"), pair[1].encode("latin-1")
        except UnicodeEncodeError:
            raise WorkerError(
                f"header {pair[0]!r} has characters HTTP cannot carry", "bad_response"
            ) from None
        value = value.strip(b" \t")
        if not _TOKEN_RE.fullmatch(name):
            raise WorkerError(f"invalid header name {pair[0]!r}", "bad_response")
        if value and not _FIELD_VALUE_RE.fullmatch(value):
            raise WorkerError(
                f"header {pair[0]!r} has a value with CR, LF, NUL or another control character",
                "bad_response",
            )
        total += len(name) + len(value) + 4
        if total > limits.max_response_header_bytes:
            raise WorkerError(
                f"the val's headers are over the {limits.max_response_header_bytes}-byte limit",
                "bad_response",
            )
        name = name.lower()
        if name in FRONT_END_HEADERS:
            continue
        # docs/contract.md §11.4: a cookie for a wider domain would reach every other user's vals.
        if name == b"set-cookie" and any(d != own_host for d in _cookie_domains(value)):
            continue
        headers.append((name, value))
    return headers


def check_reply(
    frame: Frame,
    request_id: int,
    request: type[Invocation],
    limits: LimitsConfig,
    host: str,
) -> Reply:
    """Check a worker's reply to invocation `request_id` (of kind `request`).

    Raises WorkerError on any violation, a reply of the wrong kind included.
    """
    try:
        message = parse(frame, REPLY_TO[request], Failure)
    except ValueRefusedError as exc:
        raise WorkerError(str(exc), "bad_response") from None
    except MessageError as exc:
        raise protocol_error(str(exc)) from None
    if message.id != request_id:
        raise protocol_error(f"reply for request {message.id!r}, expected {request_id}")
    log = bounded_log(message.log, limits)
    if isinstance(message, Failure):
        return Reply(check_failure(message), log, message.retire)
    try:
        if isinstance(message, Result):
            outcome: ValResponse | ValResult = ValResult(
                check_result_body(message.body, limits), log
            )
        else:
            outcome = check_response(message, limits, host, log)
    except WorkerError as exc:
        if exc.type == "protocol_error":
            raise
        # A well-formed reply whose content the val got wrong (a header, a size): its
        # error, and the worker, which kept the protocol, serves on.
        return Reply(exc, log, message.retire)
    return Reply(outcome, log, message.retire)


def check_response(message: HttpResponse, limits: LimitsConfig, host: str, log: str) -> ValResponse:
    if len(message.body) > limits.max_response_body_bytes:
        raise WorkerError(
            f"the response body is over the {limits.max_response_body_bytes}-byte limit",
            "response_too_large",
        )
    headers = check_headers(message.headers, limits, host)
    return ValResponse(message.status, headers, message.body, log)


def check_result_body(body: bytes, limits: WorkerLimits) -> bytes:
    """A result body: within the response limit, and really JSON (RFC 8259: UTF-8, no NaN)."""
    if len(body) > limits.max_response_body_bytes:
        raise WorkerError(
            f"the result is over the {limits.max_response_body_bytes}-byte limit",
            "response_too_large",
        )
    try:
        strictjson.check_any(body)  # only checked: the worker's bytes are what the client gets
    except strictjson.NestingError:
        raise WorkerError(
            "the result is JSON nested too deeply to pass on; return a flatter value",
            "val_error",
        ) from None
    except ValueError as exc:
        raise protocol_error(f"the result is not UTF-8 JSON: {exc}") from None
    return body


def check_failure(failure: Failure) -> WorkerError:
    """The val's failure as reported by a worker, bounded and made safe to re-encode."""
    details: dict[str, object] = {}
    if failure.type == "val_error":
        frames = failure.traceback[-MAX_TRACEBACK_LINES:]
        details["traceback"] = [clean_text(f[:200]) for f in frames]
    return WorkerError(
        clean_text(failure.message[:MAX_MESSAGE_CHARS]), failure.type, details=details
    )
