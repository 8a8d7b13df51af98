"""The client's address: the peer's, or, when the peer is a trusted reverse proxy, the one
its forwarding header names. Pure.

A forwarding header is whatever the client wants it to be, except for the hops that trusted
proxies appended. So the list is read from its right end (the hop our peer added) leftwards,
skipping trusted proxies: the first address that is not one is the client. Anything left of
it may be forged and is never used. Only one header is read, the one `[server]
forwarded_header` names: a proxy that sets `X-Forwarded-For` passes a client's own
`Forwarded` header along untouched, so reading both would let a client pick its address.

    X-Forwarded-For: 203.0.113.7, 10.0.0.2            -> 203.0.113.7 (10.0.0.2 trusted)
    Forwarded: for=203.0.113.7;proto=https, for="[2001:db8::1]:4711"
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

HEADERS = ("x-forwarded-for", "forwarded")


def parse_networks(proxies: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(p, strict=False) for p in proxies)


def _address(text: str) -> Address | None:
    text = text.strip().strip('"')
    if text.startswith("["):  # [v6] or [v6]:port
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _trusted(address: Address, proxies: tuple[Network, ...]) -> bool:
    return any(address in network for network in proxies)


def _hops(name: str, values: list[str]) -> list[str]:
    hops: list[str] = []
    for value in values:
        for element in value.split(","):
            if name == "x-forwarded-for":
                hops.append(element.strip())
                continue
            for pair in element.split(";"):
                key, _, param = pair.strip().partition("=")
                if key.lower() == "for":
                    hops.append(param)
    return hops


def client_address(
    peer: str | None,
    headers: Iterable[tuple[bytes, bytes]],
    proxies: tuple[Network, ...],
    header: str = "x-forwarded-for",
) -> str:
    """The client's address as text ("-" when the server knows no peer)."""
    if peer is None:
        return "-"
    if not proxies:  # nobody's forwarding header is trusted: the peer is the client
        return peer
    address = _address(peer)
    if address is None or not _trusted(address, proxies):
        return peer
    key = header.encode()
    values = [v.decode("latin-1") for k, v in headers if k.lower() == key]
    for hop in reversed(_hops(header, values)):
        hop_address = _address(hop)
        if hop_address is None:
            break  # `unknown`, an obfuscated name or garbage: the proxy that added it it is
        if not _trusted(hop_address, proxies):
            return str(hop_address)
        address = hop_address
    return str(address)
