"""`[server] processes = N`: one supervisor, N front-end processes on its sockets
(runtime/processes.py), with real processes, real sockets and real signals."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio

from runtime import processes
from runtime.config import Config, ServerConfig, StoreConfig
from runtime.errors import StartupError
from runtime.processes import Supervisor, bind_sockets, serve_processes
from runtime.schedule import Schedule
from runtime.server import serve_valrun
from runtime.store import Store
from tests.helpers import TEST_LIMITS, python
from tests.live import (
    LiveValrun,
    alive,
    children,
    cli_command,
    descendants,
    put_val,
    sleeping,
    start_live,
    write_config,
)


#: A new connection for every request: which process accepts it is the kernel's choice each
#: time, and a connection kept alive to a killed process would only show the kill.
def fresh_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_keepalive_connections=0))


SLOW = "import time\ndef slow(req):\n    time.sleep(1.5)\n    return 'done'\n"


async def answered_by(client: httpx.AsyncClient, base_url: str) -> int:
    """The pid of the front-end process that answered a fresh connection's /healthz."""
    response = await client.get(
        f"{base_url}/healthz", headers={"host": "api.localhost", "connection": "close"}
    )
    assert response.status_code == 200, response.text
    return int(response.json()["process"])


async def wait_for(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    with trio.fail_after(timeout_s):
        while not condition():
            await trio.sleep(0.05)


def front_ends(live: LiveValrun) -> list[int]:
    """The supervisor's children that are running (a killed one may linger as a zombie)."""
    return [pid for pid in children(live.process.pid) if alive(pid)]


async def test_every_child_serves_on_the_one_port(nursery: trio.Nursery, tmp_path: Path) -> None:
    live = await start_live(nursery, tmp_path, processes=2)
    first, second = front_ends(live)
    async with fresh_client() as client:
        # With one child stopped, the other takes every connection: each in turn.
        for serving in (second, first):
            with only(live, serving):
                for _ in range(3):
                    assert await answered_by(client, live.base_url) == serving
    await stop(live)


async def stop(live: LiveValrun) -> None:
    """SIGTERM, as an operator stops it: a clean exit."""
    live.process.terminate()
    with trio.fail_after(60):
        assert await live.process.wait() == 0


async def test_a_killed_child_is_replaced_while_the_other_answers(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    live = await start_live(nursery, tmp_path, processes=2)
    victim, survivor = front_ends(live)
    victims_fork_servers = children(victim)
    async with fresh_client() as client:
        await put_val(client, live, "hello", "def hello(req):\n    return 'hi'\n")
        os.kill(victim, signal.SIGKILL)
        # Every request meanwhile is answered: by the survivor, then by either.
        with trio.fail_after(60):
            while len(pids := front_ends(live)) < 2 or victim in pids:
                response = await client.get(live.base_url, headers=live.web_headers("hello"))
                assert response.status_code == 200, response.text
                await trio.sleep(0.05)
        (replacement,) = set(pids) - {survivor}
        serving = f"(pid {replacement}) is serving"
        await wait_for(lambda: any(serving in line for line in live.stderr), timeout_s=120)
        with only(live, replacement), trio.fail_after(30):
            assert await answered_by(client, live.base_url) == replacement
            response = await client.get(live.base_url, headers=live.web_headers("hello"))
            assert response.text == "hi"
    # The dead front end's fork server and workers went with it.
    await wait_for(lambda: not any(alive(pid) for pid in victims_fork_servers))
    assert any("exited with status -9" in line for line in live.stderr)
    await stop(live)


async def test_sigterm_finishes_requests_then_stops_every_process(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    live = await start_live(nursery, tmp_path, processes=2)
    async with fresh_client() as client:
        await put_val(client, live, "slow", SLOW)
        for _ in range(2):  # workers in both front ends, most likely
            await client.get(live.base_url, headers=live.web_headers("slow"))
        everything = descendants(live.process.pid)
        assert len(everything) >= 4  # two front ends, their fork servers, workers
        in_flight: list[httpx.Response] = []

        async def slow_request() -> None:
            in_flight.append(await client.get(live.base_url, headers=live.web_headers("slow")))

        async with trio.open_nursery() as requests:
            for _ in range(2):
                requests.start_soon(slow_request)
            with trio.fail_after(30):  # both in their vals' 1.5 s sleep: sent and read
                while sum(sleeping(pid) for pid in descendants(live.process.pid)) < 2:
                    await trio.sleep(0.02)
            live.process.send_signal(signal.SIGTERM)
    assert [r.status_code for r in in_flight] == [200, 200]
    assert [r.text for r in in_flight] == ["done", "done"]
    with trio.fail_after(60):
        assert await live.process.wait() == 0
    await wait_for(lambda: not any(alive(pid) for pid in everything))


async def test_children_stop_when_the_supervisor_is_killed(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    live = await start_live(nursery, tmp_path, processes=2)
    everything = descendants(live.process.pid)
    live.process.kill()
    with trio.fail_after(30):
        await live.process.wait()
    await wait_for(lambda: not any(alive(pid) for pid in everything))


@pytest.mark.parametrize("second_processes", [1, 2])
async def test_a_second_valrun_on_the_port_is_refused(
    nursery: trio.Nursery, tmp_path: Path, second_processes: int
) -> None:
    for folder in ("first", "second"):
        (tmp_path / folder).mkdir()
    live = await start_live(nursery, tmp_path / "first", processes=2)
    config = write_config(tmp_path / "second", processes=second_processes)
    with trio.fail_after(60):
        done = await trio.run_process(
            cli_command(config, "serve", "--bind", f"127.0.0.1:{live.port}"),
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 1
    assert b"the address is already in use" in done.stderr
    async with fresh_client() as client:
        await answered_by(client, live.base_url)  # the first one is untouched
    await stop(live)


# What one process changes, every other one sees within a second (runtime/feed.py).


@contextlib.contextmanager
def only(live: LiveValrun, serving: int) -> Iterator[None]:
    """Every other front end stopped (SIGSTOP): `serving` takes each new connection.

    A process stopped inside a write transaction would keep the SQLite store's lock, and
    `serving` could then write nothing (a 503 after its busy timeout). So they are stopped
    again, a moment later, until the test can take the lock itself: a stopped process then
    holds none."""
    assert "://" not in live.store, "an SQLite store: its lock is what is checked"
    others = [pid for pid in front_ends(live) if pid != serving]
    with contextlib.closing(sqlite3.connect(live.store, timeout=0)) as db:
        for attempt in range(100):
            for pid in others:
                os.kill(pid, signal.SIGSTOP)
            try:
                db.execute("BEGIN IMMEDIATE")
                db.execute("ROLLBACK")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 99:
                    raise
                for pid in others:
                    os.kill(pid, signal.SIGCONT)
                time.sleep(0.01)
    try:
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


async def answers_after(
    t0: float, ask: Callable[[], Awaitable[str]], samples_after_s: int = 3
) -> list[tuple[float, str]]:
    """(seconds after `t0` the request was sent, its answer), until three were sent more
    than a second after `t0`; how long each took to answer does not matter."""
    answers: list[tuple[float, str]] = []
    with trio.fail_after(60):
        while sum(1 for sent, _ in answers if sent >= 1.0) < samples_after_s:
            sent = trio.current_time() - t0
            answers.append((sent, await ask()))
            await trio.sleep(0.05)
    return answers


async def test_a_save_through_one_process_is_answered_by_the_other_within_a_second(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    live = await start_live(nursery, tmp_path, processes=2)
    a, b = front_ends(live)
    version = "def hello(req):\n    return 'v{}'\n"
    async with fresh_client() as client:

        async def hello() -> str:
            return (await client.get(live.base_url, headers=live.web_headers("hello"))).text

        await put_val(client, live, "hello", version.format(1))
        with only(live, b):  # b resolves it and keeps a warm worker of version 1
            assert await answered_by(client, live.base_url) == b
            assert await hello() == "v1"
        with only(live, a):
            await put_val(client, live, "hello", version.format(2))
        with only(live, b):
            # b was stopped during the save: the second starts when it runs again.
            t0 = trio.current_time()
            assert await answered_by(client, live.base_url) == b
            answers = await answers_after(t0, hello)
    assert [text for sent, text in answers if sent >= 1.0] == ["v2"] * 3, answers
    await stop(live)


async def test_a_revoked_token_is_refused_by_every_process_within_a_second(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    live = await start_live(nursery, tmp_path, processes=2)
    store = Store(tmp_path / "valrun.db")
    token = store.create_token("alice")
    (token_id,) = [t.id for t in store.tokens("alice") if t.revoked_at is None][-1:]
    store.close()
    headers = {"host": "api.localhost", "authorization": f"Bearer {token}"}
    async with fresh_client() as client:

        async def me() -> str:
            return str((await client.get(f"{live.base_url}/v1/me", headers=headers)).status_code)

        for pid in front_ends(live):
            with only(live, pid):
                assert await me() == "200"
        # The operator revokes it on the machine, as `valrun token revoke` does.
        with trio.fail_after(60):
            await trio.run_process(
                cli_command(tmp_path / "valrun.toml", "token", "revoke", str(token_id)),
                capture_stdout=True,
            )
        t0 = trio.current_time()
        for pid in front_ends(live):
            with only(live, pid):
                answers = await answers_after(t0, me)
            # The next one was stopped for this one's turn, and a stopped process sees
            # nothing: its second starts when it runs again.
            t0 = trio.current_time()
            assert [code for sent, code in answers if sent >= 1.0][-3:] == ["401"] * 3, answers
    await stop(live)


#: A run that takes 0.4 s without using the CPU.
TICK = (
    "import json, time\n"
    "def {name}(interval):\n"
    "    time.sleep(0.4)\n"
    "    print(json.dumps(interval.scheduled_at))\n"
)


def metric(text: str, name: str) -> float:
    (line,) = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.rpartition(" ")[2])


async def test_every_process_runs_the_scheduler_and_each_tick_runs_once(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    db = tmp_path / "valrun.db"
    store = Store(db)
    store.create_user("alice")
    for index in range(4):
        val, _ = store.put_val("alice", f"t{index}", TICK.format(name=f"t{index}"), None)
        store.put_schedule(val.val_id, Schedule("every", "1"), time.time(), 50)
    store.close()
    # One run at a time per process, each 0.4 s long: one process runs at most 2.5 a second,
    # so four vals due each second need both. (With quick runs one process may well run them
    # all: SQLite's busy handler backs off, and the process that holds the lock keeps winning.)
    # alice may have all four going: with the default two, the tick one process claims ahead
    # and holds, waiting for its slot, takes her second share, and the other may only skip.
    schedule = "[schedule]\nmin_interval_s = 1\nmax_concurrent = 1\nmax_concurrent_per_user = 4\n"
    live = await start_live(nursery, tmp_path, schedule, processes=2)

    def ticks() -> list[tuple[int, str]]:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            rows = conn.execute(
                "SELECT val_id, log FROM runs WHERE source = 'cron' AND error_type IS NULL"
            ).fetchall()
        return [(val_id, log.strip().splitlines()[-1]) for val_id, log in rows]

    await wait_for(lambda: len(ticks()) >= 16, timeout_s=60)
    async with fresh_client() as client:
        for pid in front_ends(live):
            with only(live, pid):
                response = await client.get(
                    f"{live.base_url}/metrics", headers={"host": "api.localhost"}
                )
            assert metric(response.text, 'valrun_scheduled_runs_total{outcome="ok"}') > 0, pid
    await stop(live)
    found = ticks()
    assert len(found) == len(set(found)), found  # no (val, scheduled time) ran twice


# The supervisor in this process, its children real (under coverage when this run is).


def config_for(tmp_path: Path, processes_n: int, shutdown_timeout_s: float = 10.0) -> Config:
    db_path = tmp_path / "valrun.db"
    Store(db_path).close()
    return Config(
        server=ServerConfig(
            bind=("127.0.0.1:0",), processes=processes_n, shutdown_timeout_s=shutdown_timeout_s
        ),
        store=StoreConfig(url=f"sqlite:///{db_path}"),
        limits=TEST_LIMITS,
    )


async def test_supervisor_in_process_serves_restarts_and_stops(tmp_path: Path) -> None:
    config = config_for(tmp_path, 2)
    supervisor = Supervisor(config, bind_sockets(config), [*python(), "-m", "runtime.processes"])
    stop = trio.Event()
    async with trio.open_nursery() as nursery, fresh_client() as client:
        with trio.fail_after(60):
            (url,) = await nursery.start(
                lambda task_status: serve_processes(
                    supervisor, shutdown_trigger=stop.wait, task_status=task_status
                )
            )
        first = supervisor.pids()
        assert len(first) == 2
        assert await answered_by(client, url) in first
        os.kill(first[0], signal.SIGTERM)  # a child that stops on its own is replaced too
        await wait_for(lambda: len(supervisor.pids()) == 2 and first[0] not in supervisor.pids())
        assert supervisor.children[0].restarts == 1
        everything = [d for pid in supervisor.pids() for d in [pid, *descendants(pid)]]
        stop.set()
    assert supervisor.pids() == []
    await wait_for(lambda: not any(alive(pid) for pid in everything))
    assert all(sock.fileno() == -1 for sock in supervisor.sockets)  # closed


async def test_draining_answers_healthz_503_while_requests_are_still_served(
    tmp_path: Path,
) -> None:
    config = config_for(tmp_path, 1)
    config = replace(config, server=replace(config.server, drain_s=60.0))
    store = Store(tmp_path / "valrun.db")
    store.create_user("alice")
    store.put_val("alice", "hello", "def hello(req):\n    return 'hi'\n", None)
    store.close()
    stop = trio.Event()
    async with trio.open_nursery() as nursery, fresh_client() as client:
        with trio.fail_after(60):
            (url,) = await nursery.start(
                lambda task_status: serve_valrun(
                    config, shutdown_trigger=stop.wait, task_status=task_status
                )
            )
        health = await client.get(f"{url}/healthz")
        assert (health.status_code, health.json()["status"]) == (200, "ok")
        stop.set()
        with trio.fail_after(30):
            while (health := await client.get(f"{url}/healthz")).status_code == 200:
                await trio.sleep(0.05)
        assert (health.status_code, health.json()["status"]) == (503, "draining")
        answer = await client.get(url, headers={"host": "alice-hello.web.localhost"})
        assert (answer.status_code, answer.text) == (200, "hi")
        nursery.cancel_scope.cancel()


def fake_child(code: str) -> list[str]:
    """A child that speaks only the supervisor's side of the protocol: `ready`, then `code`."""
    return [sys.executable, "-c", "import os, signal, sys, time\n" + code]


async def test_a_child_that_fails_before_it_is_ready_fails_the_start(tmp_path: Path) -> None:
    config = config_for(tmp_path, 2)
    ready_then_wait = "os.write(1, b'ready\\n')\ntime.sleep(60)\n"
    fails = "sys.exit(3) if sys.argv[1] == '1' else None\n" + ready_then_wait
    supervisor = Supervisor(config, bind_sockets(config), fake_child(fails))
    with trio.fail_after(30), pytest.raises(StartupError, match="process 1 exited with status 3"):
        await serve_processes(supervisor, shutdown_trigger=trio.sleep_forever)
    assert supervisor.pids() == []  # the one that was ready was stopped


async def test_the_reason_a_child_gives_is_the_supervisors_one_line(tmp_path: Path) -> None:
    config = config_for(tmp_path, 2)
    says = "os.write(1, b'failed the store is on fire\\n')\nsys.exit(1)\n"
    supervisor = Supervisor(config, bind_sockets(config), fake_child(says))
    with trio.fail_after(30), pytest.raises(StartupError) as caught:
        await serve_processes(supervisor, shutdown_trigger=trio.sleep_forever)
    assert str(caught.value) == "the store is on fire"


async def test_a_child_that_cannot_be_started_fails_the_start(tmp_path: Path) -> None:
    config = config_for(tmp_path, 2)
    missing = tmp_path / "no-such-python"
    supervisor = Supervisor(config, bind_sockets(config), [str(missing)])
    with trio.fail_after(30), pytest.raises(StartupError, match="cannot start a front-end"):
        await serve_processes(supervisor, shutdown_trigger=trio.sleep_forever)
    assert supervisor.pids() == []


async def test_a_child_that_dies_at_once_is_restarted_with_growing_pauses(
    tmp_path: Path,
) -> None:
    config = config_for(tmp_path, 1)
    supervisor = Supervisor(config, bind_sockets(config), fake_child("os.write(1, b'ready\\n')\n"))
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        started = time.monotonic()
        await nursery.start(
            lambda task_status: serve_processes(
                supervisor, shutdown_trigger=stop.wait, task_status=task_status
            )
        )
        await wait_for(lambda: supervisor.children[0].restarts >= 3)
        # Three restarts waited 0.5 + 1 + 2 s: a child that cannot live does not spin.
        assert time.monotonic() - started >= 3.5
        assert supervisor.children[0].backoff_s == 4.0
        stop.set()


async def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_for(tmp_path, 1, shutdown_timeout_s=0.0)
    stubborn = "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nos.write(1, b'ready\\n')\n"
    supervisor = Supervisor(config, bind_sockets(config), fake_child(stubborn + "time.sleep(60)"))
    supervisor.kill_after_s = 0.5
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_processes(
                supervisor, shutdown_trigger=stop.wait, task_status=task_status
            )
        )
        (pid,) = supervisor.pids()
        stop.set()
    await wait_for(lambda: not alive(pid))


def test_bind_refuses_a_port_another_socket_listens_on(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = config_for(tmp_path, 2)
        config = Config(
            server=ServerConfig(bind=(f"127.0.0.1:{port}",), processes=2), store=config.store
        )
        with pytest.raises(OSError, match="Address already in use"):
            bind_sockets(config)


async def test_children_serve_a_unix_socket_and_a_second_valrun_is_refused(
    tmp_path: Path,
) -> None:
    path = tmp_path / "valrun.sock"
    config = config_for(tmp_path, 2)
    config = replace(config, server=replace(config.server, bind=(f"unix:{path}",)))
    supervisor = Supervisor(config, bind_sockets(config), [*python(), "-m", "runtime.processes"])
    stop = trio.Event()
    transport = httpx.AsyncHTTPTransport(uds=str(path))
    async with (
        trio.open_nursery() as nursery,
        httpx.AsyncClient(transport=transport, timeout=30) as client,
    ):
        with trio.fail_after(60):
            (url,) = await nursery.start(
                lambda task_status: serve_processes(
                    supervisor, shutdown_trigger=stop.wait, task_status=task_status
                )
            )
        assert url == f"http://unix:{path}"
        health = await client.get("http://valrun/healthz", headers={"host": "api.localhost"})
        assert health.json()["process"] in supervisor.pids()
        with pytest.raises(OSError, match="is being served"):
            bind_sockets(config)  # the file is not taken over while it is served
        stop.set()
    assert supervisor.pids() == []


def test_a_child_refuses_to_bind_a_port_of_its_own() -> None:
    done = subprocess.run(
        [*processes.CHILD_COMMAND, "0"], input=b"{}\n", capture_output=True, timeout=60
    )
    assert done.returncode == 2
    assert b"serves only sockets its supervisor passes" in done.stderr


async def test_both_processes_write_whole_access_lines_soon_after_each_request(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The access lines of two front ends share the supervisor's stderr, written in batches
    (runtime.accesslog.LineBatchHandler): every request's line arrives whole, not cut into
    by the other process's, and soon after its answer even when no request follows."""
    live = await start_live(nursery, tmp_path, processes=2)
    host = {"host": f"api.localhost:{live.port}"}
    paths = [f"/v1/no-such-route-{i:04d}-{'x' * 200}" for i in range(400)]

    async def ask(chunk: list[str]) -> None:
        async with fresh_client() as client:  # its own connection: both children serve
            for path in chunk:
                assert (await client.get(live.base_url + path, headers=host)).status_code == 404

    async with trio.open_nursery() as clients:
        for start in range(0, len(paths), 50):
            clients.start_soon(ask, paths[start : start + 50])
    # Each process writes its batch within about 0.3 s of its last request, quiet or not.
    await wait_for(lambda: sum(" valrun.access [" in line for line in live.stderr) >= 400, 5)
    access = [line for line in live.stderr if "valrun.access" in line]
    for path in paths:
        (line,) = [line for line in access if f" {path} " in line]
        assert line.endswith("B"), line
        assert " 404 " in line, line
    assert {line.split("valrun.access [")[1][0] for line in access} == {"0", "1"}
    await stop(live)
