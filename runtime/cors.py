"""CORS finalization (docs/contract.md §6: Val Town's rules). Pure.

Applied to every response on a web host and to Run/Eval answers, the front end's own errors
included: a browser that cannot read an error body cannot show it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Headers = list[tuple[bytes, bytes]]

DEFAULT_ALLOW_ORIGIN = b"*"
DEFAULT_ALLOW_METHODS = b"GET,HEAD,PUT,PATCH,POST,DELETE"


def _get(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    values = [v for k, v in headers if k.lower() == name]
    return b", ".join(values) if values else None


def finalize_cors(
    method: str,
    request_headers: Sequence[tuple[bytes, bytes]],
    response_headers: Headers,
) -> Headers:
    """The response headers with valrun's CORS defaults added where the val set none."""
    # Rule 1: any access-control-* header means the val owns CORS, even an empty ACAO
    # (the documented minimal opt-out).
    if any(name.lower().startswith(b"access-control-") for name, _ in response_headers):
        return response_headers
    added = [
        (b"access-control-allow-origin", DEFAULT_ALLOW_ORIGIN),
        (b"access-control-allow-methods", DEFAULT_ALLOW_METHODS),
    ]
    # Rule 3: a preflight that names headers gets them mirrored back.
    if method == "OPTIONS" and _get(request_headers, b"access-control-request-method") is not None:
        requested = _get(request_headers, b"access-control-request-headers")
        if requested is not None:
            added.append((b"access-control-allow-headers", requested))
    return response_headers + added
