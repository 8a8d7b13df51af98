"""Connections go to the address that was checked, and keep the URL's name for Host and TLS.

`EgressTransport` is driven with a resolver of the test's own (the machine has no DNS), which
names what a lookup returns and counts the lookups; the servers are real, on loopback.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from pathlib import Path

import httpcore
import httpx
import pytest
import trio
import trustme

from runtime.egress import EgressError, EgressPolicy, IPAddress
from runtime.fetch import tls_error
from runtime.pinned import EgressTransport
from tests.fakes.remote import serve_remote

LOOPBACK = EgressPolicy.from_config(["127.0.0.1/32"], [])


class Resolver:
    """Answers each lookup with the next list of addresses; records the names looked up."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = [[ipaddress.ip_address(a) for a in answer] for answer in answers]
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> list[IPAddress]:
        self.lookups.append(host)
        return self.answers[min(len(self.lookups), len(self.answers)) - 1]


def client(policy: EgressPolicy, resolver: Resolver, **kwargs: object) -> httpx.AsyncClient:
    transport = EgressTransport(policy, resolver=resolver, **kwargs)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, trust_env=False)


async def test_the_request_goes_to_the_checked_address_under_the_urls_name(
    nursery: trio.Nursery,
) -> None:
    port = int((await nursery.start(serve_remote)).rpartition(":")[2])
    # A rebinding resolver: a public-looking answer to the check... there is no second
    # lookup to give its private answer to.
    resolver = Resolver(["127.0.0.1"], ["10.0.0.1"])
    with trio.fail_after(10):
        async with client(LOOPBACK, resolver) as http:
            first = await http.get(f"http://api.example.test:{port}/echo")
            second = await http.get(f"http://api.example.test:{port}/echo")  # pooled
    assert json.loads(first.text)["headers"][0] == ["host", f"api.example.test:{port}"]
    assert second.status_code == 200
    assert resolver.lookups == ["api.example.test"]  # one lookup, for the one connection


async def test_a_name_with_any_blocked_address_is_refused_before_connecting(
    nursery: trio.Nursery,
) -> None:
    await nursery.start(serve_remote)
    resolver = Resolver(["93.184.215.14", "127.0.0.1"])
    with trio.fail_after(10):
        async with client(EgressPolicy(), resolver) as http:
            with pytest.raises(
                EgressError, match=re.escape("'both.example.test' resolves to 127.0.0.1")
            ):
                await http.get("http://both.example.test/")


async def test_each_new_connection_checks_its_own_lookup(nursery: trio.Nursery) -> None:
    port = int((await nursery.start(serve_remote)).rpartition(":")[2])
    resolver = Resolver(["127.0.0.1"], ["127.0.0.2"])
    with trio.fail_after(10):
        async with client(LOOPBACK, resolver) as http:
            assert (await http.get(f"http://a.example.test:{port}/echo")).status_code == 200
            with pytest.raises(
                EgressError, match=re.escape("resolves to 127.0.0.2, which is loopback")
            ):
                await http.get(f"http://b.example.test:{port}/echo")


async def test_tls_verifies_the_urls_name_on_the_pinned_connection(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("api.example.test")
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(chain))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(chain), append=True)
    cert.private_key_pem.write_to_path(str(key))
    url = await nursery.start(functools.partial(serve_remote, tls=(str(chain), str(key))))
    port = int(url.rpartition(":")[2])
    context = httpx.create_ssl_context(trust_env=False)
    ca.configure_trust(context)
    with trio.fail_after(10):
        async with client(LOOPBACK, Resolver(["127.0.0.1"]), ssl_context=context) as http:
            response = await http.get(f"https://api.example.test:{port}/echo")
            assert response.status_code == 200
            # The same server, the same checked address, another name: the certificate is
            # checked against the URL's name, so this fails.
            with pytest.raises(httpcore.ConnectError) as caught:
                await http.get(f"https://other.example.test:{port}/echo")
    assert "CERTIFICATE_VERIFY_FAILED" in str(tls_error(caught.value))
