"""What the attack suites share: outcomes, the attack record, a server per module in a thread
of its own, and the checks every case makes (tests/test_attacks.py explains them)."""

from __future__ import annotations

import queue
import re
import textwrap
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from runtime.config import Config, LimitsConfig, PoolConfig, ServerConfig, StoreConfig
from runtime.server import serve_valrun
from runtime.store import Store
from tests.helpers import Service


@dataclass(frozen=True, slots=True)
class Compile:
    fragment: str


@dataclass(frozen=True, slots=True)
class Runtime:
    fragment: str
    error_type: str = "val_error"


@dataclass(frozen=True, slots=True)
class Limit:
    status: int
    error_type: str


Outcome = Compile | Runtime | Limit


@dataclass(frozen=True, slots=True)
class Attack:
    name: str
    outcome: Outcome
    source: str
    #: Why the attack still works, where the fix belongs to a file outside the sandbox policy;
    #: the case is a strict xfail until then, so the fix shows up as an XPASS to remove this.
    known_hole: str = ""


def attack(name: str, outcome: Outcome, source: str, known_hole: str = "") -> Attack:
    # Each source defines `attack(req)`; the test binds it to the val's name (the export).
    return Attack(name, outcome, textwrap.dedent(source).lstrip("\n"), known_hole)


UNDERSCORE = "is an invalid attribute name because it starts with"
# A bound method forwards attribute reads to its function (`m.__globals__`): the guards give
# vals no attributes of it at all (sandbox/resolved.py), before any `_` name is looked at.
METHOD_FORWARDING = "method objects forward attribute access to another object"


# CPU bombs meet RLIMIT_CPU (1 s) long before the wall clock on an idle machine. Workers run
# at nice 10, so on one busy with normal-priority work they may not get that second of CPU
# before the wall clock: then the wall clock stops them, and `check_outcome` accepts that.
ATTACK_LIMITS = LimitsConfig(wall_time_s=8.0, cpu_time_s=1)
ATTACK_POOL = PoolConfig(load_timeout_s=8.0)
# Sleepers use no CPU: a short wall clock (and time to load) keeps them quick.
SLEEPER_LIMITS = LimitsConfig(wall_time_s=1.5)
SLEEPER_POOL = PoolConfig(load_timeout_s=1.5)

HELLO = "def hello(req):\n    return Response.json({'greeting': 'hi ' + req.query.get('name')})\n"


@dataclass(frozen=True, slots=True)
class RunningService:
    config: Config
    port: int
    tokens: dict[str, str]
    db_path: Path

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Service]:
        """A `Service` (tests/conftest.py) with a client of the calling test's own trio run."""
        base_url = f"http://127.0.0.1:{self.port}"
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            yield Service(self.config, self.port, client, self.tokens, self.db_path)


Started = tuple[list[str], trio.lowlevel.TrioToken, trio.Event]


def _serve_in_thread(config: Config, started: queue.Queue[Started | BaseException]) -> None:
    async def main() -> None:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(partial(serve_valrun, config, shutdown_trigger=stop.wait))
            started.put((urls, trio.lowlevel.current_trio_token(), stop))

    try:
        trio.run(main)
    except BaseException as exc:  # reported to the fixture, which raises it in the test
        started.put(exc)


@contextmanager
def running_service(
    limits: LimitsConfig, db_path: Path, pool: PoolConfig | None = None
) -> Iterator[RunningService]:
    """A valrun on 127.0.0.1:0 for a whole module, with alice, bob and the `hello` val.

    pytest-trio gives each test its own trio run, so a server shared by many tests needs a
    run of its own: it lives in a thread, and each test talks to it over loopback.
    """
    config = Config(
        server=ServerConfig(bind=("127.0.0.1:0",)),
        store=StoreConfig(url=f"sqlite:///{db_path}"),
        limits=limits,
        pool=pool or PoolConfig(),
    )
    store = Store(db_path)
    tokens = {name: store.create_user(name) for name in ("alice", "bob")}
    store.close()
    started: queue.Queue[Started | BaseException] = queue.Queue()
    thread = threading.Thread(target=_serve_in_thread, args=(config, started), daemon=True)
    thread.start()
    result = started.get(timeout=30)
    if isinstance(result, BaseException):
        raise result
    urls, trio_token, stop = result
    running = RunningService(config, int(urls[0].rpartition(":")[2]), tokens, db_path)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{running.port}", timeout=30) as client:
            saved = client.put(
                "/v1/vals/alice/hello",
                json={"code": HELLO},
                headers={"host": running.config.server.api_host + f":{running.port}"}
                | {"authorization": f"Bearer {tokens['alice']}"},
            )
            assert saved.status_code == 201, saved.text
        yield running
    finally:
        trio.from_thread.run_sync(stop.set, trio_token=trio_token)
        thread.join(timeout=30)


# --- Checks ---------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


# What a successful escape would put in a response. Short host names could occur by chance.
HOSTNAME = _read("/etc/hostname")
LOOT_MARKERS = [marker for marker in (HOSTNAME if len(HOSTNAME) >= 6 else "",) if marker] + [
    "<module '",
    "<built-in function open>",
    "environ({",
]


def assert_no_loot(response: httpx.Response) -> None:
    text = response.text
    assert not re.search(r'"escaped"\s*:\s*true', text), text
    for marker in LOOT_MARKERS:
        assert marker not in text, f"{marker!r} in {text[:500]}"


def json_error(response: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text[:2000]
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == error_type, error
    return error


def check_outcome(response: httpx.Response, outcome: Outcome) -> None:
    if outcome == Limit(502, "cpu_limit") and response.status_code == 504:
        json_error(response, 504, "timeout")  # a busy machine: see ATTACK_LIMITS
    elif isinstance(outcome, Limit):
        json_error(response, outcome.status, outcome.error_type)
    elif isinstance(outcome, Compile):
        error = json_error(response, 502, "val_error")
        assert outcome.fragment in error["message"], error
        # Refused before anything ran: a run-time failure names at least one line of the val.
        assert error["traceback"] == [], error
    elif response.status_code == 200:
        body = response.json()
        assert body["escaped"] is False, body
        assert outcome.fragment in body["why"], body
    else:
        error = json_error(response, 502, outcome.error_type)
        assert outcome.fragment in error["message"], error
        if outcome.error_type == "val_error":
            assert error["traceback"], error  # it ran, and failed on one of its own lines


async def as_owner_if_load_failed(
    service: Service, name: str, response: httpx.Response
) -> httpx.Response:
    """A val that failed to load tells anonymous callers only that (its message may quote the
    source); its owner gets the full error, here through the Run API, which loads it alike."""
    if response.status_code != 502 or "failed to load" not in response.text:
        return response
    error = json_error(response, 502, response.json()["error"]["type"])
    assert error["message"].endswith("its owner can read why in the val's invocation records")
    return await service.api("POST", f"/v1/run/alice.{name}", user="alice", json={"args": []})


async def assert_service_recovers(service: Service) -> None:
    """The next request, to a normal val, is answered normally."""
    response = await service.web("alice", "hello", "/?name=after")
    assert response.status_code == 200, response.text
    assert response.json() == {"greeting": "hi after"}


async def save(service: Service, name: str, code: str, user: str = "alice") -> httpx.Response:
    return await service.api("PUT", f"/v1/vals/{user}/{name}", user=user, json={"code": code})
