"""The egress policy: where a val's `fetch` may go. Pure: URLs and addresses in, verdicts out.

A val's outbound request is made by the front end, which sits inside the operator's network:
without a policy, `fetch("http://169.254.169.254/...")` reads the cloud's instance credentials
and `fetch("http://10.0.0.5:5432/")` probes the database. So every destination address that
is not globally routable is refused, unless the operator exempts its network
(`[fetch] allow_networks`). Two checks, both here:

- `check_url`, before anything is sent: the scheme, `deny_hosts`, and a host written as an
  address in any spelling the URL allows. A URL's host "ends in a number" (WHATWG URL §3.5)
  is an IPv4 address to browsers and to the C library's `inet_aton`, which `getaddrinfo`
  uses: `2130706433`, `0x7f.1`, `0177.0.0.1` and `127.1` all mean 127.0.0.1. They are read
  the same way here, so the refusal names the address actually meant.
- `check_address`, on every address a name resolves to, just before connecting to it
  (`runtime.pinned`). That is the check that counts: a name may resolve anywhere, and the
  connection goes to the very address checked, so a second lookup cannot swap it (DNS
  rebinding).

An IPv6 address that carries an IPv4 address (IPv4-mapped ::ffff:0:0/96, NAT64 64:ff9b::/96)
is judged by the IPv4 address it reaches.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SCHEMES = ("http", "https")

# Special-purpose ranges (IANA's IPv4 and IPv6 Special-Purpose Address Registries, RFC 6890),
# each with the reason a refusal gives. Anything else that `ipaddress` does not call global is
# refused too; this table is what makes the refusals say why.
_RANGES = (
    ("0.0.0.0/8", "unspecified ('this network', RFC 1122)"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "carrier-grade NAT (RFC 6598)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata services live here)"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "reserved for IETF protocol assignments"),
    ("192.0.2.0/24", "reserved for documentation"),
    ("192.88.99.0/24", "the deprecated 6to4 relay anycast"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("198.18.0.0/15", "reserved for benchmarking"),
    ("198.51.100.0/24", "reserved for documentation"),
    ("203.0.113.0/24", "reserved for documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("255.255.255.255/32", "broadcast"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    # The deprecated IPv4-compatible form ::a.b.c.d, and the rest of ::/8.
    ("::/8", "reserved"),
    ("64:ff9b:1::/48", "local-use NAT64 (RFC 8215)"),
    ("100::/64", "discard-only (RFC 6666)"),
    ("2001::/23", "reserved for IETF protocols (Teredo included)"),
    ("2001:db8::/32", "reserved for documentation"),
    ("2002::/16", "6to4 (it tunnels to an IPv4 address)"),
    ("fc00::/7", "unique local (private)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated, private)"),
    ("ff00::/8", "multicast"),
)
_BLOCKED: tuple[tuple[IPNetwork, str], ...] = tuple(
    # Most specific first: 255.255.255.255 is "broadcast", not the "reserved" of 240/4.
    sorted(
        ((ipaddress.ip_network(cidr), reason) for cidr, reason in _RANGES),
        key=lambda entry: -entry[0].prefixlen,
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052's well-known prefix
# Host names as a resolver takes them: LDH labels (and `_`, which some records use).
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_NUMBER_RE = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)")


class EgressError(Exception):
    """The egress policy refuses this destination; the message says which rule and why."""


class BadURLError(ValueError):
    """Not a URL that `fetch` can request (no host, a malformed one)."""


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    """`[fetch] allow_networks` and `deny_hosts`, parsed."""

    allow_networks: tuple[IPNetwork, ...] = ()
    deny_hosts: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_config(cls, allow_networks: Iterable[str], deny_hosts: Iterable[str]) -> EgressPolicy:
        """ValueError names a bad CIDR."""
        networks = []
        for cidr in allow_networks:
            try:
                networks.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                raise ValueError(f"{cidr!r} is not a network (write e.g. 10.1.2.0/24)") from None
        hosts = frozenset(host.lower().rstrip(".") for host in deny_hosts)
        return cls(tuple(networks), hosts)


@dataclass(frozen=True, slots=True)
class Target:
    """A destination that passed `check_url`: `address` is set when the URL names one."""

    scheme: str
    host: str
    port: int
    address: IPAddress | None


def blocked_reason(address: IPAddress, policy: EgressPolicy) -> str | None:
    """Why `address` may not be reached, or None when it may."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            return "an IPv6 address with a zone id (it names a local interface)"
        embedded = address.ipv4_mapped
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            if _allowed(address, policy):
                return None
            reason = blocked_reason(embedded, policy)
            return None if reason is None else f"{reason}, written as IPv6 {address}"
    if _allowed(address, policy):
        return None
    for network, reason in _BLOCKED:
        if address.version == network.version and address in network:
            return reason
    if not address.is_global:
        return "not globally routable"
    return None


def check_address(
    host: str, address: IPAddress, policy: EgressPolicy, *, resolved: bool = False
) -> None:
    """EgressError unless `address` (which `host` names, or `resolved` to) may be reached."""
    reason = blocked_reason(address, policy)
    if reason is None:
        return
    via = ""
    if resolved:
        via = f"{host!r} resolves to "
    elif host != str(address):
        via = f"{host!r} means "
    raise EgressError(
        f"blocked by the egress policy: {via}{address}, which is {reason}; vals may only "
        "reach public addresses (an operator can exempt a network with [fetch] allow_networks)"
    )


def check_url(url: str, policy: EgressPolicy) -> Target:
    """The destination of `url`, or EgressError (refused) / BadURLError (not a URL)."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise BadURLError(f"{_shown(url)} is not a valid URL: {exc}") from None
    if parsed.scheme not in SCHEMES:
        raise EgressError(
            f"blocked by the egress policy: {parsed.scheme or 'no'} scheme in {_shown(url)}; "
            "only http and https URLs can be fetched"
        )
    host = parsed.host.lower()
    if not host:
        raise BadURLError(f"{_shown(url)} has no host; write e.g. https://example.com/path")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    address = parse_host(host)
    if address is not None:
        check_address(host, address, policy)
        return Target(parsed.scheme, host, port, address)
    name = host.removesuffix(".")
    if len(name) > 253 or not _NAME_RE.fullmatch(name):
        raise BadURLError(f"{host!r} is not a valid host name")
    for denied in policy.deny_hosts:
        if name == denied or name.endswith("." + denied):
            raise EgressError(
                f"blocked by the egress policy: the host {name!r} is refused by the "
                f"operator ([fetch] deny_hosts has {denied!r})"
            )
    return Target(parsed.scheme, name, port, None)


def parse_host(host: str) -> IPAddress | None:
    """The address a URL host names, in any spelling; None for a name to resolve.

    BadURLError for a host that must be an address (it ends in a number, or is bracketed
    IPv6) but is not a valid one: a resolver would guess, and so would this check.
    """
    if ":" in host:  # httpx has taken the brackets off
        try:
            return ipaddress.IPv6Address(host.replace("%25", "%"))
        except ValueError:
            raise BadURLError(f"[{host}] is not a valid IPv6 address") from None
    labels = host.removesuffix(".").split(".")
    if not _NUMBER_RE.fullmatch(labels[-1]):
        return None
    return _parse_ipv4(host, labels)


def _parse_ipv4(host: str, labels: list[str]) -> ipaddress.IPv4Address:
    # inet_aton(3) and WHATWG's IPv4 parser: 1 to 4 parts, each decimal, octal (leading 0) or
    # hex (0x); the last part fills all the bytes the earlier ones left (127.1 = 127.0.0.1).
    if len(labels) > 4:
        raise BadURLError(f"{host!r} is not a valid IPv4 address (more than four parts)")
    parts = []
    for label in labels:
        if not _NUMBER_RE.fullmatch(label):
            raise BadURLError(f"{host!r} is not a valid IPv4 address ({label!r})")
        if label.startswith("0x"):
            value = int(label[2:] or "0", 16)
        elif len(label) > 1 and label.startswith("0"):
            if not set(label) <= set("01234567"):
                raise BadURLError(f"{host!r} is not a valid IPv4 address (octal {label!r})")
            value = int(label, 8)
        else:
            value = int(label)
        parts.append(value)
    *leading, last = parts
    if any(part > 255 for part in leading) or last >= 256 ** (5 - len(parts)):
        raise BadURLError(f"{host!r} is not a valid IPv4 address (a part is too large)")
    number = last
    for index, part in enumerate(leading):
        number += part << (8 * (3 - index))
    return ipaddress.IPv4Address(number)


def _allowed(address: IPAddress, policy: EgressPolicy) -> bool:
    return any(
        address.version == network.version and address in network
        for network in policy.allow_networks
    )


def _shown(url: str) -> str:
    """A URL for a message: without its query (which may hold a secret), cut short."""
    shown = url.partition("?")[0].partition("#")[0]
    return repr(shown if len(shown) <= 200 else shown[:200] + "...")
