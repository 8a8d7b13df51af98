"""The request target (RFC 9112 §3.2) as valrun serves it: origin form. Pure.

A client may send the absolute form (`GET http://host/path HTTP/1.1`), which servers must
accept (§3.2.2) and which names the authority twice: in the target and in `Host`. valrun
routes by `Host` (runtime.hosts), so a target naming another authority is refused with 400
rather than answered by the Host's tenant, and one naming the same is served as its origin
form, so that a val's `req.path` and `req.url` are what they would be for `GET /path`.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from runtime.errors import BadRequestError

_ABSOLUTE = re.compile(rb"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?#]*)(?P<path>.*)")
DEFAULT_PORTS = {b"http": b"80", b"https": b"443"}


def _authority(value: bytes, scheme: bytes) -> bytes:
    value = value.lower()
    default = DEFAULT_PORTS.get(scheme)
    if default and value.endswith(b":" + default):
        value = value[: -len(default) - 1]
    return value


def origin_form(raw_path: bytes, host: str | None, scheme: str) -> bytes:
    """The target's origin-form path (without the query, which ASGI keeps apart)."""
    if raw_path.startswith(b"/") or raw_path == b"*":
        return raw_path
    found = _ABSOLUTE.fullmatch(raw_path)
    if found is None:
        raise BadRequestError(
            "the request target must be a path (/...) or an absolute URL", "bad_target"
        )
    target_scheme = found["scheme"].lower()
    if target_scheme not in DEFAULT_PORTS or b"@" in found["authority"]:
        raise BadRequestError(
            "the request target must be an http or https URL without user information",
            "bad_target",
        )
    named = _authority(found["authority"], target_scheme)
    sent = _authority((host or "").encode("latin-1"), target_scheme)
    if named != sent:
        raise BadRequestError(
            "the request target names another authority than the Host header; send the "
            "path alone, or the same host in both",
            "bad_target",
        )
    path = found["path"]
    return path if path.startswith(b"/") else b"/" + path


def decoded_path(raw_path: bytes) -> str:
    """The path as ASGI servers decode it (percent-decoded, as hypercorn does)."""
    return unquote(raw_path.decode("latin-1"))
