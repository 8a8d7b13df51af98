"""Host routing (docs/contract.md §3): which part of valrun a request's Host header names. Pure.

api.localhost            -> ApiHost()
alice-hello.web.localhost -> ValHost("alice", "hello")
anything else            -> UnknownHost(...)
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from runtime.errors import BadRequestError

USER_RE = re.compile(r"[a-z][a-z0-9_]{0,38}")
VAL_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}")
# Host names as browsers send them; `_` is not valid DNS but appears in usernames, and
# browsers pass it through for *.localhost.
_HOSTNAME_RE = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")


@dataclass(frozen=True, slots=True)
class ApiHost:
    pass


@dataclass(frozen=True, slots=True)
class ValHost:
    user: str
    val: str  # lower-cased: val names are unique per user case-insensitively


@dataclass(frozen=True, slots=True)
class UnknownHost:
    host: str


Route = ApiHost | ValHost | UnknownHost


def normalize_hostname(name: str) -> str:
    return name.lower().removesuffix(".")


def is_hostname(name: str) -> bool:
    return bool(_HOSTNAME_RE.fullmatch(name)) and ".." not in name


def split_host(header: str) -> tuple[str, int | None]:
    """`Host` header -> (normalized host name or IP literal, port). Raises BadRequestError."""
    header = header.strip()
    port: str | None = None
    if header.startswith("["):
        literal, bracket, rest = header[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise BadRequestError(f"malformed Host header {header!r}", "bad_host")
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise BadRequestError(
                f"malformed IPv6 literal in Host {header!r}", "bad_host"
            ) from None
        host, port = literal.lower(), rest[1:] if rest else None
    else:
        host, colon, port_text = header.rpartition(":")
        if not colon:
            host, port_text = header, ""
        port = port_text if colon else None
        host = normalize_hostname(host)
        if not is_hostname(host):
            raise BadRequestError(f"malformed Host header {header!r}", "bad_host")
    if port is None:
        return host, None
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise BadRequestError(f"malformed port in Host header {header!r}", "bad_host")
    return host, int(port)


def route_host(header: str | None, api_host: str, web_domain: str) -> Route:
    if not header:
        raise BadRequestError("the request has no Host header", "bad_host")
    host, _port = split_host(header)
    if host == api_host:
        return ApiHost()
    label = host.removesuffix("." + web_domain)
    if label == host or "." in label:
        return UnknownHost(host)
    user, hyphen, val = label.rpartition("-")
    if not hyphen or not USER_RE.fullmatch(user) or not VAL_RE.fullmatch(val):
        return UnknownHost(host)
    return ValHost(user, val)


def val_host(user: str, val: str, web_domain: str) -> str:
    return f"{user}-{val.lower()}.{web_domain}"
