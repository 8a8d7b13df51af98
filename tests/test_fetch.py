"""`std.fetch` end to end: a real valrun, real workers, and real HTTP servers on loopback.

The servers (tests/fakes/remote.py) stand in for the outside world; the configs here name
exactly their address, 127.0.0.1/32, in `allow_networks`. Everything else a val might try is
refused by the default policy (the spellings themselves are tabled in test_egress.py).
"""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from runtime.config import FetchConfig
from runtime.fetch import open_fetcher
from runtime.pool import ValSpec
from sandbox.confine import ALL_LAYERS
from sandbox.messages import FetchAsk
from tests.confine_kit import assert_refused, run_driver
from tests.fakes.remote import serve_remote
from tests.helpers import Service, StartService

LOOPBACK_ONLY = FetchConfig(allow_networks=("127.0.0.1/32",))

FETCH = """
from std import fetch, FetchError
def main(url, kwargs):
    try:
        r = fetch(url, **kwargs)
    except FetchError as exc:
        return {"error": str(exc)}
    return {"status": r.status, "ok": r.ok, "url": r.url, "body": r.text(),
            "headers": r.headers.items(), "type": r.headers.get("content-type")}
main
"""


@pytest.fixture
async def remote(nursery: trio.Nursery) -> str:
    url: str = await nursery.start(serve_remote)
    return url


async def fetch(
    service: Service, url: str, *, user: str = "alice", **kwargs: Any
) -> dict[str, Any]:
    """What a val's `fetch(url, **kwargs)` gave: the response's fields, or {"error": ...}."""
    with trio.fail_after(30):
        response = await service.api(
            "POST", "/v1/eval", user=user, json={"code": FETCH, "args": [url, kwargs]}
        )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def test_a_val_fetches_from_an_allowed_server(
    start_service: StartService, remote: str
) -> None:
    service = await start_service(fetch=LOOPBACK_ONLY)
    result = await fetch(
        service,
        f"{remote}/echo?q=1",
        method="post",
        json={"a": 1},
        headers={"x-trace": "t-1", "user-agent": "hook/2"},
    )
    assert (result["status"], result["ok"], result["url"]) == (200, True, f"{remote}/echo?q=1")
    seen = json.loads(result["body"])
    assert (seen["method"], seen["query"], json.loads(seen["body"])) == ("POST", "q=1", {"a": 1})
    headers = dict(seen["headers"])
    assert headers["host"] == remote.removeprefix("http://")
    assert headers["x-trace"] == "t-1"
    assert headers["content-type"] == "application/json"
    assert headers["accept-encoding"] == "identity"
    # valrun names itself and the val, after whatever the val calls itself.
    assert headers["user-agent"].startswith("hook/2 valrun/")
    assert headers["user-agent"].endswith(" (+alice/eval)")
    assert result["type"] == "application/json"


async def test_connections_are_pooled_across_invocations(
    start_service: StartService, remote: str
) -> None:
    service = await start_service(fetch=LOOPBACK_ONLY)
    ports = set()
    for user in ("alice", "alice", "bob"):
        result = await fetch(service, f"{remote}/echo", user=user)
        ports.add(json.loads(result["body"])["client_port"])
    assert len(ports) == 1  # one kept-alive connection served all three


async def test_proxy_and_certificate_settings_in_the_environment_are_ignored(
    remote: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("SSL_CERT_FILE", "/nonexistent.pem")
    spec = ValSpec(1, 1, "alice", "hook", "", (), "alice-hook.web.localhost")
    with trio.fail_after(10):
        async with open_fetcher(LOOPBACK_ONLY) as fetcher:
            answer = await fetcher.answer(spec, FetchAsk(1, "GET", f"{remote}/echo"))
    assert (answer.status, answer.error) == (200, None)


async def test_the_response_is_read_only(start_service: StartService, remote: str) -> None:
    service = await start_service(fetch=LOOPBACK_ONLY)
    code = """
from std import fetch
def attempt(n, r):
    if n == 0:
        r.status = 1
    else:
        r.headers.x = 1
def main(url):
    r = fetch(url)
    out = []
    for n in range(2):
        try:
            attempt(n, r)
            out.append("allowed")
        except Exception as exc:
            out.append(str(exc))
    return [r.json()["path"], r.headers.getall("content-type"), r.status, out]
main
"""
    with trio.fail_after(30):
        response = await service.api(
            "POST", "/v1/eval", json={"code": code, "args": [f"{remote}/echo"]}
        )
    assert response.status_code == 200, response.text
    path, types, status, refusals = response.json()
    assert (path, types, status) == ("/echo", ["application/json"], 200)
    assert "allowed" not in refusals, refusals


# Every refusal of the default policy, end to end: the worker gets a FetchError that says why.
BLOCKED = [
    ("http://127.0.0.1:{port}/echo", "loopback"),
    ("http://localhost:{port}/echo", "'localhost' resolves to"),
    ("http://2130706433:{port}/echo", "means 127.0.0.1"),
    ("http://0x7f.1:{port}/echo", "means 127.0.0.1"),
    ("http://0177.1:{port}/echo", "means 127.0.0.1"),
    ("http://[::1]:{port}/echo", "loopback"),
    ("http://[::ffff:127.0.0.1]:{port}/echo", "loopback, written as IPv6"),
    ("http://[64:ff9b::7f00:1]:{port}/echo", "loopback, written as IPv6"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://0.0.0.0:{port}/", "unspecified"),
    ("http://10.0.0.1/", "private"),
    ("http://100.64.0.1/", "carrier-grade NAT"),
    ("http://224.0.0.1/", "multicast"),
    ("http://[fe80::1%25lo]:{port}/", "zone id"),
    ("ftp://127.0.0.1/", "only http and https"),
    ("file:///etc/passwd", "only http and https"),
]


async def test_every_blocked_destination_is_refused_with_its_reason(
    service: Service, remote: str
) -> None:
    port = remote.rpartition(":")[2]
    for template, reason in BLOCKED:
        url = template.format(port=port)
        result = await fetch(service, url)
        assert "error" in result, (url, result)
        assert reason in result["error"], (url, result["error"])


async def test_a_redirect_to_a_blocked_address_is_refused(
    start_service: StartService, remote: str
) -> None:
    service = await start_service(fetch=LOOPBACK_ONLY)
    port = remote.rpartition(":")[2]
    for target, reason in [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        (f"http://[::1]:{port}/echo", "loopback"),
        ("http://10.1.2.3/", "private"),
    ]:
        result = await fetch(service, str(httpx.URL(f"{remote}/redirect", params={"to": target})))
        assert result.get("error", "").startswith("redirect 1: blocked by the egress policy"), (
            target,
            result,
        )
        assert reason in result["error"]


async def test_redirects_are_followed_hop_by_hop_up_to_five(
    start_service: StartService, remote: str
) -> None:
    service = await start_service(fetch=LOOPBACK_ONLY)
    to_echo = str(httpx.URL(f"{remote}/redirect", params={"to": "/echo?after=1"}))
    result = await fetch(service, to_echo, method="POST", body="gone after a 302")
    seen = json.loads(result["body"])
    assert result["url"] == f"{remote}/echo?after=1"
    assert (seen["method"], seen["body"]) == ("GET", "")  # 302 after POST: GET, as browsers do
    kept = str(httpx.URL(f"{remote}/redirect", params={"to": "/echo", "status": "307"}))
    seen = json.loads((await fetch(service, kept, method="PUT", body="kept"))["body"])
    assert (seen["method"], seen["body"]) == ("PUT", "kept")
    unfollowed = await fetch(service, to_echo, follow_redirects=False)
    assert unfollowed["status"] == 302
    assert ["location", "/echo?after=1"] in unfollowed["headers"]
    loop = await fetch(service, f"{remote}/loop")
    assert loop["error"].startswith("more than 5 redirects")


async def test_slow_and_endless_servers_time_out(start_service: StartService, remote: str) -> None:
    service = await start_service(fetch=LOOPBACK_ONLY)
    ok = await fetch(service, f"{remote}/slow?s=0.2", timeout_s=2.5)
    assert ok["body"] == "slow answer"
    slow = await fetch(service, f"{remote}/slow?s=30", timeout_s=0.5)
    assert slow["error"].startswith("timed out after 0.5 s")
    endless = await fetch(service, f"{remote}/forever", timeout_s=0.5)
    assert endless["error"].startswith("timed out after 0.5 s")
    # The val cannot ask for more than the operator allows.
    capped = replace(LOOPBACK_ONLY, timeout_s=0.5)
    service = await start_service(fetch=capped)
    slow = await fetch(service, f"{remote}/slow?s=30", timeout_s=100)
    assert slow["error"].startswith("timed out after 0.5 s")


@pytest.mark.parametrize("chunked", ["", "1"])
async def test_a_response_over_the_cap_is_refused(
    start_service: StartService, remote: str, chunked: str
) -> None:
    service = await start_service(fetch=replace(LOOPBACK_ONLY, max_response_bytes=100_000))
    fits = await fetch(service, f"{remote}/big?n=100000")
    assert len(fits["body"]) == 100_000
    over = await fetch(service, f"{remote}/big?n=300000&chunked={chunked}")
    assert over["error"].startswith("the response is over 100000 bytes")


async def test_fetches_per_invocation_are_limited(start_service: StartService, remote: str) -> None:
    service = await start_service(fetch=replace(LOOPBACK_ONLY, max_requests_per_invocation=3))
    code = """
from std import fetch, FetchError
def main(url):
    out = []
    for i in range(5):
        try:
            out.append(fetch(url).status)
        except FetchError as exc:
            out.append(str(exc))
    return out
main
"""
    for _ in range(2):  # the count is per invocation: a second one starts afresh
        with trio.fail_after(30):
            response = await service.api(
                "POST", "/v1/eval", json={"code": code, "args": [f"{remote}/echo"]}
            )
        outcomes = response.json()
        assert outcomes[:3] == [200, 200, 200]
        assert all(o.startswith("too many requests in one invocation") for o in outcomes[3:])
    # The record lists the refusals once, with a count: a loop cannot grow it.
    evals = await service.api("GET", "/v1/me/evals")
    fetches = evals.json()["runs"][0]["fetches"]
    assert [f.get("status") for f in fetches] == [200, 200, 200, None]
    assert fetches[3]["repeated"] == 1


async def test_a_fetch_past_the_vals_wall_time_is_cancelled(
    start_service: StartService, remote: str
) -> None:
    # wall_time_s=3 (tests' limits); the fetch alone would wait 10 s for the slow server.
    service = await start_service(fetch=LOOPBACK_ONLY)
    await service.put_val(
        "waits",
        f"""
from std import fetch
def waits(req):
    return fetch("{remote}/slow?s=60").text()
""",
    )
    started = trio.current_time()
    with trio.fail_after(30):
        response = await service.web("alice", "waits")
    assert response.status_code == 504, response.text
    assert response.json()["error"]["type"] == "timeout"
    assert trio.current_time() - started < 9
    runs = await service.api("GET", "/v1/vals/alice/waits/runs")
    (record,) = runs.json()["runs"]
    (entry,) = record["fetches"]
    assert entry["error"].startswith("cancelled")


async def test_records_list_fetches_without_query_or_env_values(
    start_service: StartService, remote: str
) -> None:
    service = await start_service(fetch=LOOPBACK_ONLY)
    await service.api("PUT", "/v1/env/TOKEN", content=b"tok-5ecret-value")
    await service.put_val(
        "hook",
        f"""
from std import fetch, FetchError
def hook(req):
    fetch("{remote}/echo/" + env["TOKEN"] + "?key=" + env["TOKEN"])
    try:
        fetch("http://169.254.169.254/" + env["TOKEN"], method=env["TOKEN"])
    except FetchError:
        pass
    return "done"
""",
    )
    with trio.fail_after(30):
        assert (await service.web("alice", "hook")).status_code == 200
        runs = await service.api("GET", "/v1/vals/alice/hook/runs")
    (record,) = runs.json()["runs"]
    assert "5ecret" not in json.dumps(record)
    ok, blocked = record["fetches"]
    host = remote.removeprefix("http://").partition(":")[0]
    assert ok["method"] == "GET"
    assert ok["scheme"] == "http"
    assert ok["host"] == host
    assert ok["path"] == "/echo/[env TOKEN]"
    assert ok["status"] == 404
    assert ok["bytes"] == len("no such path")
    assert ok["ms"] > 0
    assert blocked["path"] == "/[env TOKEN]"
    assert "link-local" in blocked["error"]
    assert blocked["method"] == "[env TOKEN]"
    assert "status" not in blocked


async def test_metrics_count_fetches_by_outcome(start_service: StartService, remote: str) -> None:
    service = await start_service(fetch=LOOPBACK_ONLY)
    await fetch(service, f"{remote}/echo")
    await fetch(service, "http://10.0.0.1/")
    await fetch(service, "http://nonexistent.invalid/")
    metrics = (await service.client.get("/metrics", headers={"host": service.api_host})).text
    assert 'valrun_fetches_total{outcome="ok"} 1' in metrics
    assert 'valrun_fetches_total{outcome="blocked"} 1' in metrics
    assert 'valrun_fetches_total{outcome="dns"} 1' in metrics


async def test_failures_say_what_happened(start_service: StartService, remote: str) -> None:
    service = await start_service(fetch=LOOPBACK_ONLY)
    with trio.socket.socket() as unused:  # a port nobody listens on
        await unused.bind(("127.0.0.1", 0))
        closed = unused.getsockname()[1]
    refused = await fetch(service, f"http://127.0.0.1:{closed}/")
    assert refused["error"].startswith(f"could not connect to '127.0.0.1' on port {closed}")
    tls = await fetch(service, f"https://{remote.removeprefix('http://')}/echo")
    assert tls["error"].startswith("TLS with '127.0.0.1' failed")
    dns = await fetch(service, "http://nonexistent.invalid/")
    assert dns["error"].startswith("DNS lookup of 'nonexistent.invalid' failed")
    framing = await fetch(service, f"{remote}/echo", headers={"host": "example.com"})
    assert framing["error"] == "the host header is set by valrun's HTTP client; leave it out"


async def test_fetch_can_be_turned_off(start_service: StartService, remote: str) -> None:
    service = await start_service(fetch=replace(LOOPBACK_ONLY, enabled=False))
    result = await fetch(service, f"{remote}/echo")
    assert result["error"].startswith("outbound HTTP is turned off")


async def test_fetches_beyond_the_users_slots_wait_and_time_out(
    start_service: StartService, nursery: trio.Nursery
) -> None:
    slow_arrived = trio.Event()

    def arrived(path: str) -> None:
        if path == "/slow":
            slow_arrived.set()

    remote: str = await nursery.start(functools.partial(serve_remote, arrived=arrived))
    config = replace(LOOPBACK_ONLY, max_concurrent_per_user=1)
    service = await start_service(fetch=config, wall_time_s=10.0)
    holder: dict[str, Any] = {}

    async def hold_the_slot() -> None:
        holder.update(await fetch(service, f"{remote}/slow?s=3", timeout_s=8))

    async with trio.open_nursery() as inner:
        inner.start_soon(hold_the_slot)
        with trio.fail_after(20):
            await slow_arrived.wait()  # alice's one slot is taken until the answer
        waited = await fetch(service, f"{remote}/echo", timeout_s=1)
        bobs = await fetch(service, f"{remote}/echo", user="bob")
    assert waited["error"].startswith("timed out after 1 s waiting for a free slot")
    assert "1 fetches of alice's vals were in flight" in waited["error"]
    assert bobs["status"] == 200  # bob's vals have slots of their own
    assert holder["body"] == "slow answer"


async def test_fetch_while_the_module_loads_is_refused(
    start_service: StartService, remote: str
) -> None:
    service = await start_service(fetch=LOOPBACK_ONLY)
    code = f"from std import fetch\nDATA = fetch('{remote}/echo')\ndef eager(req):\n    return 1\n"
    response = await service.api("PUT", "/v1/vals/alice/eager", json={"code": code})
    if response.status_code in (200, 201):  # saved; the load fails on the first request
        with trio.fail_after(30):
            # Its owner reads why it failed to load (anyone else is told only that it did).
            response = await service.api("POST", "/v1/run/alice.eager", json={"args": []})
    assert "inside the exported function" in response.text


@pytest.mark.parametrize("module", ["requests", "urllib.request", "http.client", "socket"])
async def test_network_imports_point_to_std_fetch(service: Service, module: str) -> None:
    with trio.fail_after(30):
        response = await service.api("POST", "/v1/eval", json={"code": f"import {module}\n1"})
    assert response.status_code == 502
    assert "from std import fetch" in response.json()["error"]["message"]


async def test_a_confined_worker_still_has_no_network_of_its_own(
    tmp_path: Path, service: Service, remote: str
) -> None:
    # What a val could do if it escaped the policy and got `socket` anyway: the confinement
    # the workers run under refuses it, even to a server that fetch may reach.
    port = int(remote.rpartition(":")[2])
    code = f"s = socket.create_connection(('127.0.0.1', {port}), timeout=5); s.close()"
    assert_refused(run_driver(tmp_path, code, ALL_LAYERS), "PermissionError")
