"""docs/deploy.md, run: two real valrun nodes on one store (PostgreSQL, and an SQLite file),
behind the guide's own nginx and Caddy configurations (tests/proxy_kit.py), on loopback.

- Every fenced block of the guide is a diagram or is run here.
- A change made through one node is seen by the other within a second (the change feed).
- nginx: one node killed with SIGKILL under load; every request sent after that is answered
  by the other, and no acknowledged save is lost.
- Caddy: one node drained with SIGTERM under load; its /healthz says draining, nothing fails.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio

from runtime.config import parse_config
from runtime.store import Store
from tests.live import LiveValrun, alive, cli_command, descendants, start_live
from tests.proxy_kit import (
    Certificate,
    ProxyClient,
    certificate,
    doc_blocks,
    run_caddy,
    run_nginx,
)

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "deploy.md"
BLOCKS = doc_blocks(GUIDE)
API = "api.example.com"
WEB = "web.example.com"


def block(language: str) -> str:
    (found,) = [b.text for b in BLOCKS if b.language == language]
    return found


def test_every_block_of_the_guide_is_a_diagram_or_is_run_here() -> None:
    for found in BLOCKS:
        assert found.language in ("", "toml", "nginx", "caddyfile"), f"deploy.md:{found.line}"
    parse_config(tomllib.loads(block("toml")))


def node_server_lines() -> str:
    """The guide's [server] table for a node on loopback: its own bind comes from the test,
    and the proxy it trusts is 127.0.0.1."""
    server = dict(tomllib.loads(block("toml"))["server"])
    del server["bind"]
    server["trusted_proxies"] = ["127.0.0.1"]
    return "".join(
        f"{key} = {str(value).lower() if isinstance(value, bool) else json.dumps(value)}\n"
        for key, value in server.items()
    )


async def start_nodes(nursery: trio.Nursery, tmp_path: Path, store: str) -> list[LiveValrun]:
    """Two nodes on one store, one process each: a PostgreSQL database (tests/pg_kit.py), or
    an SQLite file (two nodes on one machine, also a deployment)."""
    nodes = []
    for index in range(2):
        folder = tmp_path / f"node{index}"
        folder.mkdir()
        # Users' blob and SQL storage: one directory both nodes share (docs/deploy.md §5).
        storage = f'[storage]\ndata_dir = "{tmp_path / "storage"}"\n'
        # Every acknowledged save is checked afterwards: none may go to the version quota.
        storage += "[quotas]\nmax_versions_per_val = 100000\n"
        nodes.append(
            await start_live(nursery, folder, storage, store=store, server=node_server_lines())
        )
    return nodes


def direct(node: LiveValrun) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=node.base_url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)
    )


def auth(node: LiveValrun) -> dict[str, str]:
    return {"host": API, "authorization": f"Bearer {node.token}"}


def web(val: str) -> dict[str, str]:
    return {"host": f"alice-{val}.{WEB}"}


async def answers_after(
    t0: float, ask: Callable[[], Awaitable[str]], samples: int = 3
) -> list[tuple[float, str]]:
    """(seconds after `t0` each request was sent, its answer) until `samples` were sent a
    second or more after `t0`: how long a loaded machine takes to answer does not count."""
    answers: list[tuple[float, str]] = []
    with trio.fail_after(60):
        while sum(1 for sent, _ in answers if sent >= 1.0) < samples:
            sent = trio.current_time() - t0
            answers.append((sent, await ask()))
            await trio.sleep(0.05)
    return answers


async def stop_node(node: LiveValrun) -> None:
    node.process.terminate()
    with trio.fail_after(60):
        assert await node.process.wait() == 0


async def test_a_change_through_one_node_is_seen_by_the_other_within_a_second(
    nursery: trio.Nursery, tmp_path: Path, store_location: str
) -> None:
    first, second = await start_nodes(nursery, tmp_path, store_location)
    code = "def hello(req):\n    return 'v{}'\n"
    async with direct(first) as one, direct(second) as other:
        saved = await one.put("/v1/vals/alice/hello", headers=auth(first), content=code.format(1))
        assert saved.status_code == 201, saved.text
        assert (await other.get("/", headers=web("hello"))).text == "v1"  # cached, warm there

        async def hello() -> str:
            return (await other.get("/", headers=web("hello"))).text

        saved = await one.put("/v1/vals/alice/hello", headers=auth(first), content=code.format(2))
        assert saved.status_code == 200, saved.text
        answers = await answers_after(trio.current_time(), hello)
        assert [text for sent, text in answers if sent >= 1.0] == ["v2"] * 3, answers

        # A token revoked on one node's machine is refused by the other.
        store = Store(store_location)
        token = store.create_token("alice")
        token_id = max(t.id for t in store.tokens("alice"))
        store.close()
        bearer = {"host": API, "authorization": f"Bearer {token}"}

        async def me() -> str:
            return str((await other.get("/v1/me", headers=bearer)).status_code)

        assert await me() == "200"
        config = tmp_path / "node0" / "valrun.toml"
        with trio.fail_after(60):
            await trio.run_process(cli_command(config, "token", "revoke", str(token_id)))
        answers = await answers_after(trio.current_time(), me)
        assert [code for sent, code in answers if sent >= 1.0] == ["401"] * 3, answers
    for node in (first, second):
        await stop_node(node)


@dataclass
class Load:
    """Requests through the proxy while a node goes away: what was sent when, and answered."""

    client: ProxyClient
    token: str
    #: (sent at, what, status, answered at) of every request; status 0: no answer (the
    #: connection failed or was cut).
    results: list[tuple[float, str, int, float]] = field(default_factory=list)
    #: Saves the proxy answered 200/201: version -> the code sent.
    acknowledged: dict[int, str] = field(default_factory=dict)
    running: bool = True

    async def reader(self) -> None:
        while self.running:
            sent = trio.current_time()
            try:
                status = (await self.client.request("GET", f"alice-hello.{WEB}", "/")).status_code
            except httpx.TransportError:
                status = 0
            self.results.append((sent, "get", status, trio.current_time()))

    async def saver(self) -> None:
        count = 0
        while self.running:
            count += 1
            code = f"def saver(req):\n    return 'save {count}'\n"
            sent = trio.current_time()
            try:
                response = await self.client.request(
                    "PUT",
                    API,
                    "/v1/vals/alice/saver",
                    content=code,
                    headers={"authorization": f"Bearer {self.token}"},
                )
            except httpx.TransportError:
                self.results.append((sent, "save", 0, trio.current_time()))
                continue
            self.results.append((sent, "save", response.status_code, trio.current_time()))
            if response.status_code in (200, 201):
                self.acknowledged[int(response.json()["version"])] = code


async def run_load(load: Load, during: Callable[[], Awaitable[None]]) -> None:
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(load.reader)
        nursery.start_soon(load.saver)
        await during()
        load.running = False


async def check_saves(load: Load, node: LiveValrun) -> None:
    """Every acknowledged save is in the store, as sent; the latest is what the val runs."""
    assert load.acknowledged
    # One kept-alive connection for the hundreds of reads: a new one each would meet the
    # node's per-address connection cap (this client and the proxy share 127.0.0.1).
    async with httpx.AsyncClient(base_url=node.base_url, timeout=30) as client:
        for version, code in load.acknowledged.items():
            got = await client.get(f"/v1/vals/alice/saver?v={version}", headers=auth(node))
            assert (got.status_code, got.json()["code"]) == (200, code), version
        latest = max(load.acknowledged)
        listed = await client.get("/v1/vals/alice/saver/versions", headers=auth(node))
        assert max(v["version"] for v in listed.json()["versions"]) == latest
        # What the latest acknowledged code returns: its count, which is not its version
        # when a save the kill cut off was stored unacknowledged.
        expected = re.search(r"'(save \d+)'", load.acknowledged[latest])
        assert expected is not None
        answer = await client.get("/", headers=web("saver"))
        assert answer.text == expected.group(1)


async def proxied_nodes(
    nursery: trio.Nursery, tmp_path: Path, store: str
) -> tuple[list[LiveValrun], Certificate]:
    nodes = await start_nodes(nursery, tmp_path, store)
    async with direct(nodes[0]) as client:
        code = "def hello(req):\n    return 'hi'\n"
        saved = await client.put("/v1/vals/alice/hello", headers=auth(nodes[0]), content=code)
        assert saved.status_code == 201, saved.text
    return nodes, await certificate(tmp_path / "tls", (API, f"*.{WEB}"))


async def test_nginx_sends_everything_to_the_other_node_after_one_is_killed(
    nursery: trio.Nursery, tmp_path: Path, store_location: str
) -> None:
    nodes, cert = await proxied_nodes(nursery, tmp_path, store_location)
    victim, survivor = nodes
    ports = [node.port for node in nodes]
    async with run_nginx(tmp_path / "nginx", block("nginx"), ports, cert) as port:
        client = ProxyClient(port, cert)
        # Both nodes serve: nginx takes turns.
        seen = set()
        for _ in range(6):
            health = await client.request("GET", API, "/healthz")
            assert health.status_code == 200, health.text
            seen.add(health.json()["process"])
        assert seen == {victim.process.pid, survivor.process.pid}
        load = Load(client, victim.token)
        victims = [victim.process.pid, *descendants(victim.process.pid)]
        killed_at: list[float] = []

        async def kill_one() -> None:
            with trio.fail_after(60):
                while len(load.acknowledged) < 3:  # under load: saves and reads going on
                    await trio.sleep(0.05)
            victim.process.kill()
            killed_at.append(trio.current_time())
            with trio.fail_after(60):
                await victim.process.wait()
                while not any(sent > killed_at[0] + 2 for sent, *_ in load.results):
                    await trio.sleep(0.05)
                # ...and a few more saves after the kill.
                saves = len(load.acknowledged)
                while len(load.acknowledged) < saves + 3:
                    await trio.sleep(0.05)

        await run_load(load, kill_one)
        await client.aclose()
    after = [(what, status) for sent, what, status, _ in load.results if sent > killed_at[0]]
    assert len(after) > 10
    assert all(status in (200, 201) for _, status in after), [
        r for r in after if r[1] not in (200, 201)
    ]
    # Before the kill everything was answered too, but for what the kill cut off: a save that
    # had reached the victim (nginx resends no PUT it had already sent), or an answer the
    # victim had begun to send (nginx cannot resend what its client has begun to read). Each
    # such request was still in flight at the kill, and its client was told (no answer, or a
    # 502 from nginx): unacknowledged, never a wrong answer.
    kill = killed_at[0]
    before = [r for r in load.results if r[0] <= kill]
    cut = [r for r in before if r[2] not in (200, 201)]
    assert all(done >= kill and status in (0, 502) for _, _, status, done in cut), cut
    assert len(cut) <= 4, cut  # at most what was in flight: three readers and the saver
    await check_saves(load, survivor)
    # nginx met the dead node (a connection refused, or reset mid-request) and went on.
    errors = (tmp_path / "nginx" / "error.log").read_text()
    assert f'upstream: "http://127.0.0.1:{victim.port}/' in errors
    # The killed node's fork server and workers went with it.
    with trio.fail_after(30):
        while any(alive(pid) for pid in victims):
            await trio.sleep(0.05)
    await stop_node(survivor)


async def test_caddy_stops_sending_to_a_draining_node_and_nothing_fails(
    nursery: trio.Nursery, tmp_path: Path, store_location: str
) -> None:
    nodes, cert = await proxied_nodes(nursery, tmp_path, store_location)
    leaving, staying = nodes
    ports = [node.port for node in nodes]
    async with run_caddy(tmp_path / "caddy", block("caddyfile"), ports, cert) as port:
        client = ProxyClient(port, cert)
        load = Load(client, leaving.token)
        states: list[str] = []

        async def drain_one() -> None:
            with trio.fail_after(60):
                while len(load.acknowledged) < 3:
                    await trio.sleep(0.05)
            leaving.process.terminate()
            async with direct(leaving) as to_leaving:
                with trio.fail_after(30):
                    while not states or states[-1] != "draining":
                        health = await to_leaving.get("/healthz", headers={"host": API})
                        states.append(health.json()["status"])
            with trio.fail_after(60):
                assert await leaving.process.wait() == 0
            saves = len(load.acknowledged)
            with trio.fail_after(60):
                while len(load.acknowledged) < saves + 3:
                    await trio.sleep(0.05)

        await run_load(load, drain_one)
        await client.aclose()
    assert states[-1] == "draining"
    statuses = [status for _, _, status, _ in load.results]
    assert len(statuses) > 10
    assert all(status in (200, 201) for status in statuses), load.results
    await check_saves(load, staying)
    await stop_node(staying)


@pytest.mark.parametrize("drain_s", [5.0])
def test_the_guides_drain_outlasts_caddys_health_check(drain_s: float) -> None:
    """drain_s must cover the balancer's interval plus its timeout, or it may keep sending
    to a node that has stopped accepting (which it would then retry, slower)."""
    caddyfile = block("caddyfile")
    interval = float(caddyfile.split("health_interval ")[1].split("s")[0])
    timeout = float(caddyfile.split("health_timeout ")[1].split("s")[0])
    assert parse_config(tomllib.loads(block("toml"))).server.drain_s == drain_s
    assert drain_s > interval + timeout
