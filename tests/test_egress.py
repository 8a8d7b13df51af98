"""The egress policy as tables: every spelling of a blocked destination, and what passes.

Pure: no network. The end-to-end refusals (a val's FetchError) are in test_fetch.py; the
resolved-address check at connect time is in test_pinned.py.
"""

from __future__ import annotations

import ipaddress
import re

import pytest

from runtime.egress import (
    BadURLError,
    EgressError,
    EgressPolicy,
    blocked_reason,
    check_address,
    check_url,
    parse_host,
)

DEFAULT = EgressPolicy()

# url, what the refusal says
BLOCKED_URLS = [
    # loopback, in every spelling a URL host allows
    ("http://127.0.0.1/", "127.0.0.1, which is loopback"),
    ("http://127.0.0.1:8080/x", "loopback"),
    ("http://127.1/", "'127.1' means 127.0.0.1"),  # short form: the last part fills 3 bytes
    ("http://127.0.1/", "'127.0.1' means 127.0.0.1"),
    ("http://2130706433/", "'2130706433' means 127.0.0.1"),  # decimal
    ("http://0x7f000001/", "'0x7f000001' means 127.0.0.1"),  # hex
    ("http://0x7F.1/", "'0x7f.1' means 127.0.0.1"),  # hex part, short form, upper case
    ("http://0x7f.0.0.1/", "'0x7f.0.0.1' means 127.0.0.1"),
    ("http://0177.1/", "'0177.1' means 127.0.0.1"),  # octal
    ("http://0177.0.1/", "'0177.0.1' means 127.0.0.1"),
    ("http://127.0.0.1./", "loopback"),  # trailing dot
    ("http://[::1]/", "::1, which is loopback"),
    ("http://[0:0:0:0:0:0:0:1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback, written as IPv6"),  # IPv4-mapped
    ("http://[::ffff:7f00:1]/", "loopback, written as IPv6"),
    ("http://[64:ff9b::7f00:1]/", "loopback, written as IPv6"),  # NAT64
    ("http://[64:ff9b::a9fe:a9fe]/", "link-local (cloud metadata services live here), written"),
    ("http://[::127.0.0.1]/", "reserved"),  # the deprecated IPv4-compatible form
    # unspecified
    ("http://0.0.0.0/", "unspecified"),
    ("http://0/", "'0' means 0.0.0.0, which is unspecified"),
    ("http://[::]/", "unspecified"),
    # private, link-local, metadata
    ("http://10.0.0.1/", "private (RFC 1918)"),
    ("http://172.16.5.4/", "private (RFC 1918)"),
    ("http://192.168.1.1/", "private (RFC 1918)"),
    ("http://3232235777/", "'3232235777' means 192.168.1.1, which is private"),
    ("http://169.254.169.254/latest/meta-data/", "link-local (cloud metadata"),
    ("http://0xa9fea9fe/", "'0xa9fea9fe' means 169.254.169.254"),
    ("http://0251.0376.0xa9fe/", "means 169.254.169.254"),  # octal, octal, hex
    ("http://[fe80::1]/", "link-local"),
    ("http://[fe80::1%25eth0]/", "zone id"),
    ("http://[fd00::1]/", "unique local"),
    ("http://[fec0::1]/", "site-local"),
    # CGNAT, multicast, reserved, broadcast, documentation, benchmarking
    ("http://100.64.0.1/", "carrier-grade NAT"),
    ("http://100.127.255.254/", "carrier-grade NAT"),
    ("http://224.0.0.1/", "multicast"),
    ("http://239.255.255.250/", "multicast"),
    ("http://[ff02::1]/", "multicast"),
    ("http://[ff0e::1]/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://255.255.255.255/", "broadcast"),
    ("http://192.0.2.1/", "documentation"),
    ("http://198.18.0.1/", "benchmarking"),
    ("http://[2001:db8::1]/", "documentation"),
    ("http://[2002:7f00:1::]/", "6to4"),
    ("http://[2001::1]/", "Teredo"),
    ("http://[100::1]/", "discard-only"),
    ("http://[64:ff9b:1::1]/", "local-use NAT64"),
    # schemes
    ("ftp://example.com/", "only http and https"),
    ("file:///etc/passwd", "only http and https"),
    ("gopher://127.0.0.1:25/", "only http and https"),
]


@pytest.mark.parametrize(("url", "reason"), BLOCKED_URLS)
def test_blocked_destinations_are_refused_with_the_reason(url: str, reason: str) -> None:
    with pytest.raises(EgressError) as caught:
        check_url(url, DEFAULT)
    assert str(caught.value).startswith("blocked by the egress policy")
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://0177.0.0.1/", "not a valid URL"),  # httpx refuses octal in dotted quads
        ("http://1.2.3.4.5/", "more than four parts"),
        ("http://256.1/", "too large"),
        ("http://0x100000000/", "too large"),
        ("http://1.2.3.09/", "not a valid URL"),
        ("http://1.2.09/", "octal"),
        ("http://0251.0376.0251.0376/", "not a valid URL"),
        ("http://a.0x7f/", "not a valid IPv4 address"),  # ends in a number: must be IPv4
        ("http://exa%41mple.com/", "not a valid host name"),
        ("http://" + "a." * 127 + "com/", "not a valid host name"),  # over 253 characters
        ("http:///path", "has no host"),
        ("not a url at all", "only http and https"),
    ],
)
def test_hosts_that_are_not_addresses_or_names_are_refused(url: str, message: str) -> None:
    with pytest.raises((BadURLError, EgressError)) as caught:
        check_url(url, DEFAULT)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("url", "host", "port", "address"),
    [
        ("https://api.example.com/v1?key=x", "api.example.com", 443, None),
        ("http://Example.COM./", "example.com", 80, None),
        ("http://example.com:8080/", "example.com", 8080, None),
        ("http://8.8.8.8/", "8.8.8.8", 80, "8.8.8.8"),
        ("http://134744072/", "134744072", 80, "8.8.8.8"),  # decimal for a public address
        ("http://[2606:4700::1111]/", "2606:4700::1111", 80, "2606:4700::1111"),
        ("http://[64:ff9b::808:808]/", "64:ff9b::808:808", 80, "64:ff9b::808:808"),
        ("http://[::ffff:8.8.8.8]/", "::ffff:8.8.8.8", 80, "::ffff:808:808"),
        ("http://my_host.internal-ish.example/", "my_host.internal-ish.example", 80, None),
    ],
)
def test_public_destinations_pass(url: str, host: str, port: int, address: str | None) -> None:
    target = check_url(url, DEFAULT)
    assert (target.host, target.port) == (host, port)
    assert target.address == (None if address is None else ipaddress.ip_address(address))


def test_allow_networks_exempts_exactly_the_networks_named() -> None:
    policy = EgressPolicy.from_config(["127.0.0.1/32", "10.1.0.0/16"], [])
    for url in ["http://127.0.0.1:9/", "http://[::ffff:127.0.0.1]/", "http://10.1.200.3/"]:
        check_url(url, policy)
    for url in ["http://127.0.0.2/", "http://[::1]/", "http://10.2.0.1/", "http://0x7f000002/"]:
        with pytest.raises(EgressError):
            check_url(url, policy)


def test_deny_hosts_refuses_the_name_and_its_subdomains() -> None:
    policy = EgressPolicy.from_config([], ["Metadata.Google.Internal.", "evil.example"])
    for url in [
        "http://metadata.google.internal/",
        "http://METADATA.google.internal./computeMetadata/",
        "https://a.b.evil.example/",
    ]:
        with pytest.raises(EgressError, match="deny_hosts"):
            check_url(url, policy)
    check_url("https://notevil.example/", policy)


@pytest.mark.parametrize(
    ("address", "blocked"),
    [
        ("127.0.0.53", True),
        ("::1", True),
        ("::ffff:10.0.0.1", True),
        ("::ffff:100.64.1.1", True),
        ("64:ff9b::c0a8:101", True),
        ("fe80::1%2", True),
        ("93.184.215.14", False),
        ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", False),
        ("64:ff9b::5db8:d70e", False),  # NAT64 of a public address reaches a public address
    ],
)
def test_resolved_addresses_are_judged_alike(address: str, blocked: bool) -> None:
    parsed = ipaddress.ip_address(address)
    assert (blocked_reason(parsed, DEFAULT) is not None) == blocked
    if blocked:
        with pytest.raises(EgressError, match=re.escape("'name.example' resolves to")):
            check_address("name.example", parsed, DEFAULT, resolved=True)


def test_a_bad_network_in_the_config_is_named() -> None:
    with pytest.raises(ValueError, match=re.escape("'10.0.0.0/33' is not a network")):
        EgressPolicy.from_config(["10.0.0.0/33"], [])


def test_names_are_left_to_the_resolver() -> None:
    assert parse_host("example.com") is None
    assert parse_host("1x.example") is None  # ends in a label that is not a number
