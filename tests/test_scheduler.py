"""Scheduled vals end to end: the real server on 127.0.0.1:0, real workers, a real SQLite file,
with `[schedule] min_interval_s = 1` so that ticks come every second.

Tolerance: a run starts at most LATE_S after its tick. The scheduler looks at the store at
least every 0.5 s and wakes at the next due tick, so on an idle machine runs start within a
few milliseconds; LATE_S leaves room for a machine busy with other test suites.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from runtime.config import Config, LimitsConfig, ScheduleConfig, ServerConfig, StoreConfig
from runtime.schedule import Schedule
from runtime.server import serve_valrun
from runtime.store import Store
from tests.helpers import Service

LATE_S = 2.0
SCHEDULE = ScheduleConfig(min_interval_s=1)

# Prints what it was called with, one JSON line per run.
REPORT = """\
import json
import time

def {name}(interval):
    print(json.dumps({{"scheduled_at": interval.scheduled_at, "last_run_at": interval.last_run_at,
                      "schedule": interval.schedule, "tag": "{tag}"}}))
    time.sleep({sleep_s})
"""


def report_val(name: str, tag: str = "v1", sleep_s: float = 0.0) -> str:
    return REPORT.format(name=name, tag=tag, sleep_s=sleep_s)


@dataclass
class Node:
    service: Service
    stop: trio.Event
    stopped: trio.Event


StartNode = Callable[..., Awaitable[Node]]


@pytest.fixture
async def start_node(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[StartNode]:
    """Start a valrun on tmp_path/valrun.db (the same file each time: a restart); keyword
    arguments replace fields of [schedule]."""
    db_path = tmp_path / "valrun.db"
    store = Store(db_path)
    tokens = {name: store.create_user(name) for name in ("alice", "bob")}
    store.close()
    clients: list[httpx.AsyncClient] = []

    async def start(**overrides: Any) -> Node:
        config = Config(
            server=ServerConfig(bind=("127.0.0.1:0",), shutdown_timeout_s=2.0),
            store=StoreConfig(url=f"sqlite:///{db_path}"),
            limits=LimitsConfig(wall_time_s=10.0),
            schedule=replace(SCHEDULE, **overrides),
        )
        stop, stopped = trio.Event(), trio.Event()

        async def run(task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await serve_valrun(config, shutdown_trigger=stop.wait, task_status=task_status)
            finally:
                stopped.set()

        with trio.fail_after(20):
            urls: list[str] = await nursery.start(run)
        port = int(urls[0].rpartition(":")[2])
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30)
        clients.append(client)
        return Node(Service(config, port, client, tokens, db_path), stop, stopped)

    yield start
    for client in clients:
        await client.aclose()


async def cron_runs(service: Service, val: str) -> list[dict[str, Any]]:
    """The val's scheduled runs (skips included), oldest first."""
    response = await service.api("GET", f"/v1/vals/alice/{val}/runs?limit=1000")
    assert response.status_code == 200, response.text
    return [r for r in reversed(response.json()["runs"]) if r["source"] == "cron"]


async def wait_for_runs(
    service: Service, val: str, count: int, done: Callable[[dict[str, Any]], bool] = bool
) -> list[dict[str, Any]]:
    """Poll the records until `count` scheduled runs satisfy `done` (fail_after bounds it)."""
    with trio.fail_after(30):
        while True:
            runs = await cron_runs(service, val)
            if sum(1 for r in runs if done(r)) >= count:
                return runs
            await trio.sleep(0.2)


def reported(run: dict[str, Any]) -> dict[str, Any]:
    line = run["log"].strip().splitlines()[-1]
    value: dict[str, Any] = json.loads(line)
    return value


def ran(run: dict[str, Any]) -> bool:
    return bool(run["error"] is None)


async def schedule(
    service: Service, val: str, body: dict[str, object], user: str = "alice"
) -> httpx.Response:
    return await service.api("PUT", f"/v1/vals/{user}/{val}/schedule", user=user, json=body)


async def test_ticks_run_on_time_with_the_interval_object(start_node: StartNode) -> None:
    service = (await start_node()).service
    await service.put_val("tick", report_val("tick"))
    set_at = time.time()
    put = await schedule(service, "tick", {"every_s": 1})
    assert put.status_code == 201, put.text
    assert put.json()["schedule"] == "@every 1s"
    runs = await wait_for_runs(service, "tick", 4)
    seen = [reported(r) for r in runs]
    first = seen[0]["scheduled_at"]
    assert set_at + 1 - 0.01 <= first <= set_at + 1 + LATE_S  # one interval after it was set
    previous_start = None
    for run, value in zip(runs, seen, strict=True):
        assert run["status"] == 200
        assert run["version"] == 1
        assert value["schedule"] == "@every 1s"
        assert value["tag"] == "v1"
        # On the phase of the first tick, and started within the tolerance.
        assert (value["scheduled_at"] - first) % 1.0 == pytest.approx(0.0, abs=1e-6)
        assert 0 <= run["time"] - value["scheduled_at"] <= LATE_S
        if previous_start is None:
            assert value["last_run_at"] is None
        else:
            # last_run_at is when the previous run was claimed, just before it started.
            assert value["last_run_at"] == pytest.approx(previous_start, abs=LATE_S)
        previous_start = run["time"]
    assert len({v["scheduled_at"] for v in seen}) == len(seen)
    shown = (await service.api("GET", "/v1/vals/alice/tick/schedule")).json()
    assert shown["every_s"] == 1
    assert shown["next_run_at"] > seen[-1]["scheduled_at"]
    assert shown["last_run_at"] >= seen[-1]["scheduled_at"]


async def test_a_tick_during_a_run_is_skipped_and_recorded_never_run_twice_at_once(
    start_node: StartNode,
) -> None:
    service = (await start_node()).service
    await service.put_val("slow", report_val("slow", sleep_s=2.2))
    await schedule(service, "slow", {"every_s": 1})
    runs = await wait_for_runs(service, "slow", 2, done=ran)
    skipped = [r for r in runs if not ran(r)]
    assert skipped, runs
    for run in skipped:
        assert run["status"] == 409
        assert run["error"]["type"] == "skipped"
        assert "previous run was still going" in run["error"]["message"]
    real = [r for r in runs if ran(r)]
    for before, after in itertools.pairwise(real):
        assert after["time"] >= before["time"] + before["duration_ms"] / 1000 - 0.05
    metrics = (await service.api("GET", "/metrics", user=None)).text
    assert int(sample(metrics, 'valrun_scheduled_runs_total{outcome="skipped"}')) >= len(skipped)


def sample(metrics: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.MULTILINE)
    assert found, name
    return float(found.group(1))


async def test_a_failing_val_keeps_its_schedule_and_each_failure_is_recorded(
    start_node: StartNode,
) -> None:
    service = (await start_node()).service
    await service.put_val("boom", "def boom(interval):\n    raise ValueError('no luck')\n")
    await schedule(service, "boom", {"every_s": 1})
    runs = await wait_for_runs(service, "boom", 3)
    for run in runs:
        assert run["status"] == 502
        assert run["error"]["type"] == "val_error"
        assert "no luck" in run["error"]["message"]
    assert (await service.api("GET", "/v1/vals/alice/boom/schedule")).status_code == 200
    metrics = (await service.api("GET", "/metrics", user=None)).text
    assert sample(metrics, 'valrun_scheduled_runs_total{outcome="error"}') >= 3
    assert sample(metrics, "valrun_schedule_lateness_seconds_count") >= 3


async def test_the_next_tick_runs_the_new_version(start_node: StartNode) -> None:
    service = (await start_node()).service
    await service.put_val("ver", report_val("ver", tag="v1"))
    await schedule(service, "ver", {"every_s": 1})
    await wait_for_runs(service, "ver", 1)
    await service.put_val("ver", report_val("ver", tag="v2"))
    runs = await wait_for_runs(service, "ver", 2, done=lambda r: r["version"] == 2)
    first_v2 = next(i for i, r in enumerate(runs) if r["version"] == 2)
    assert all(r["version"] == 2 and reported(r)["tag"] == "v2" for r in runs[first_v2:])


async def test_a_removed_schedule_or_deleted_val_never_fires_again(start_node: StartNode) -> None:
    service = (await start_node()).service
    for name in ("off", "doomed"):
        await service.put_val(name, report_val(name))
        await schedule(service, name, {"every_s": 1})
    await wait_for_runs(service, "off", 1)
    await wait_for_runs(service, "doomed", 1)
    assert (await service.api("DELETE", "/v1/vals/alice/off/schedule")).status_code == 200
    removed_at = time.time()
    assert (await service.api("DELETE", "/v1/vals/alice/doomed")).status_code == 200
    # A new val of the same name is another val: the schedule did not carry over.
    await service.put_val("doomed", report_val("doomed"))
    await trio.sleep(2.5)  # two and a half ticks in which nothing may fire
    # A tick claimed just before the removal may still have run (and been recorded) since.
    ticks = [reported(run)["scheduled_at"] for run in await cron_runs(service, "off") if ran(run)]
    assert ticks, "it ran before its schedule was removed"
    assert max(ticks) < removed_at, (ticks, removed_at)
    assert await cron_runs(service, "doomed") == []
    for name in ("off", "doomed"):
        gone = await service.api("GET", f"/v1/vals/alice/{name}/schedule")
        assert gone.status_code == 404
        assert "has no schedule" in gone.json()["error"]["message"]


async def test_ticks_missed_while_down_make_one_catch_up_run(start_node: StartNode) -> None:
    node = await start_node()
    await node.service.put_val("catch", report_val("catch"))
    await schedule(node.service, "catch", {"every_s": 1})
    await wait_for_runs(node.service, "catch", 1)
    node.stop.set()
    with trio.fail_after(20):
        await node.stopped.wait()
    await trio.sleep(3.5)  # down for three ticks or more
    restarted_at = time.time()
    service = (await start_node()).service
    runs = await wait_for_runs(
        service, "catch", 3, done=lambda r: ran(r) and r["time"] >= restarted_at
    )
    runs = sorted((r for r in runs if ran(r)), key=lambda r: r["time"])
    # (A tick that comes while the catch-up run is still going is skipped, as any other.)
    after = [reported(r) for r in runs if r["time"] >= restarted_at]
    missed = [v for v in after if v["scheduled_at"] < restarted_at]
    assert len(missed) == 1, after  # one catch-up run, however many ticks were missed
    before = [reported(r) for r in runs if r["time"] < restarted_at]
    assert missed[0]["scheduled_at"] == pytest.approx(before[-1]["scheduled_at"] + 1, abs=1e-6)
    # It stands for three ticks or more: missed, missed + 1 and missed + 2 were all due.
    assert restarted_at - missed[0]["scheduled_at"] >= 2.0


# The API: owner only, clear refusals.


async def test_schedule_api_is_for_the_owner_only(start_node: StartNode) -> None:
    service = (await start_node()).service
    await service.put_val("pub", report_val("pub"))
    await service.put_val("priv", report_val("priv"), privacy="private")
    assert (await schedule(service, "pub", {"every_s": 300})).status_code == 201
    assert (
        await schedule(service, "pub", {"cron": "*/5 * * * *", "tz": "Europe/Paris"})
    ).status_code == 200
    shown = (await service.api("GET", "/v1/vals/alice/pub/schedule")).json()
    assert shown["cron"] == "*/5 * * * *"
    assert shown["tz"] == "Europe/Paris"
    assert shown["next_run_at"] % 300 == 0
    assert shown["last_run_at"] is None
    path = "/v1/vals/alice/{}/schedule"
    cases = [
        ("PUT", "pub", "bob", 403),
        ("DELETE", "pub", "bob", 403),
        ("GET", "pub", "bob", 403),
        ("GET", "priv", "bob", 404),  # a private val's existence is not revealed
        ("PUT", "pub", None, 401),
        ("GET", "pub", None, 401),
        ("GET", "nope", "alice", 404),
        ("PUT", "nope", "alice", 404),
    ]
    for method, val, user, status in cases:
        body = {"json": {"every_s": 60}} if method == "PUT" else {}
        response = await service.api(method, path.format(val), user=user, **body)
        assert response.status_code == status, (method, val, user, response.text)
        assert response.json()["error"]["type"]
    assert (await service.api("GET", path.format("pub"))).json()["cron"] == "*/5 * * * *"


async def test_bad_schedules_and_limits_are_clear_4xx(start_node: StartNode) -> None:
    service = (await start_node(min_interval_s=30, max_per_user=2)).service
    for name in ("a", "b", "c"):
        await service.put_val(name, report_val(name))
    bad = await schedule(service, "a", {"every_s": 10})
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "bad_schedule"
    assert "from 30" in bad.json()["error"]["message"]
    not_json = await service.api("PUT", "/v1/vals/alice/a/schedule", content=b"{")
    assert not_json.status_code == 400
    assert not_json.json()["error"]["type"] == "bad_json"
    assert (await schedule(service, "a", {"every_s": 30})).status_code == 201
    assert (await schedule(service, "b", {"every_s": 30})).status_code == 201
    over = await schedule(service, "c", {"every_s": 30})
    assert over.status_code == 409
    assert over.json()["error"]["type"] == "schedule_limit"
    assert (await schedule(service, "a", {"every_s": 40})).status_code == 200  # a change is fine
    assert (await service.api("DELETE", "/v1/vals/alice/a/schedule")).status_code == 200
    assert (await service.api("DELETE", "/v1/vals/alice/a/schedule")).status_code == 404
    assert (await schedule(service, "c", {"every_s": 30})).status_code == 201


async def test_a_disabled_scheduler_keeps_schedules_but_runs_none(start_node: StartNode) -> None:
    service = (await start_node(enabled=False)).service
    await service.put_val("idle", report_val("idle"))
    assert (await schedule(service, "idle", {"every_s": 1})).status_code == 201
    await trio.sleep(2.5)
    assert await cron_runs(service, "idle") == []


# The CLI, as a user runs it.


async def valrun_cli(service: Service, *args: str) -> str:
    config = service.db_path.with_suffix(".toml")
    config.write_text(f'[server]\nbind = ["127.0.0.1:{service.port}"]\n')
    with trio.fail_after(30):
        done = await trio.run_process(
            [sys.executable, "-m", "runtime.cli", "--config", str(config), "val", *args],
            env={"VALRUN_TOKEN": service.tokens["alice"], "PATH": "/usr/bin:/bin"},
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    return done.stdout.decode()


async def test_cli_schedule_every_cron_off_and_show(start_node: StartNode) -> None:
    service = (await start_node()).service
    await service.put_val("job", report_val("job"))
    assert "schedule: none" in await valrun_cli(service, "show", "alice/job")
    assert '"every_s": 300' in await valrun_cli(service, "schedule", "alice/job", "--every", "300")
    shown = await valrun_cli(service, "show", "alice/job")
    assert "schedule: @every 300s" in shown
    assert "last run never" in shown
    await valrun_cli(service, "schedule", "alice/job", "0 9 * * 1-5", "--tz", "Europe/Paris")
    assert "schedule: 0 9 * * 1-5 (Europe/Paris)" in await valrun_cli(service, "show", "alice/job")
    as_json = json.loads(await valrun_cli(service, "show", "alice/job", "--json"))
    assert as_json["schedule"]["cron"] == "0 9 * * 1-5"
    assert "code" not in as_json
    await valrun_cli(service, "schedule", "alice/job", "--off")
    assert "schedule: none" in await valrun_cli(service, "show", "alice/job")


# Several front ends on one store: each tick runs once.


async def start_process(nursery: trio.Nursery, config: Path) -> tuple[trio.Process, int]:
    """`valrun serve` as a real process; its port, read from its log line when it is up."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "runtime.cli", "--config", str(config), "serve"],
        stdout=None,
        stderr=-1,  # subprocess.PIPE
    )
    assert process.stderr is not None
    stderr = process.stderr
    buffer = b""
    with trio.fail_after(30):
        while not (found := re.search(rb"valrun is serving on http://127\.0\.0\.1:(\d+)", buffer)):
            chunk = await stderr.receive_some()
            assert chunk, buffer.decode(errors="replace")
            buffer += chunk

    async def drain() -> None:  # its access log must not fill the pipe
        while await stderr.receive_some():
            pass

    nursery.start_soon(drain)
    return process, int(found.group(1))


async def test_two_valrun_processes_on_one_store_run_each_tick_once(
    nursery: trio.Nursery, tmp_path: Path, store_location: str
) -> None:
    db_path = store_location  # an SQLite file, then a PostgreSQL database
    store = Store(db_path)
    store.create_user("alice")
    # Each run takes 0.4 s and a node runs one at a time: four vals due each second are more
    # than one node can run, so both must take some. (Quick runs may all go to one: SQLite's
    # busy handler lets the node holding the lock win claim after claim.)
    names = [f"v{i}" for i in range(4)]
    for name in names:
        val, _ = store.put_val("alice", name, report_val(name, sleep_s=0.4), None)
        store.put_schedule(val.val_id, Schedule("every", "1"), time.time(), 50)
    store.close()
    config = tmp_path / "valrun.toml"
    config.write_text(
        # One process per node: each node's /metrics then counts all of its runs.
        '[server]\nbind = ["127.0.0.1:0"]\nprocesses = 1\n'
        f'[store]\nurl = "{db_path if store.postgres else f"sqlite:///{db_path}"}"\n'
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\n'
        "[schedule]\nmin_interval_s = 1\nmax_concurrent = 1\nmax_concurrent_per_user = 6\n"
    )
    nodes: list[tuple[trio.Process, int]] = []
    try:
        for _ in range(2):
            nodes.append(await start_process(nursery, config))
        async with httpx.AsyncClient(timeout=10) as client:

            async def ok_runs() -> list[float]:
                oks = []
                for _, port in nodes:
                    metrics = await client.get(
                        f"http://127.0.0.1:{port}/metrics", headers={"host": "api.localhost"}
                    )
                    oks.append(sample(metrics.text, 'valrun_scheduled_runs_total{outcome="ok"}'))
                return oks

            oks: list[float] = []
            with trio.move_on_after(60):  # the nodes may start seconds apart under load
                while min(oks := await ok_runs()) == 0 or _cron_count(db_path) < len(names) * 3:
                    await trio.sleep(0.5)
    finally:
        for process, _ in nodes:
            process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            for process, _ in nodes:
                await process.wait()
    assert len(oks) == 2, oks
    assert min(oks) > 0, oks  # both nodes took ticks
    rows = _cron_rows(db_path)
    ticks = [(val_id, json.loads(log.splitlines()[-1])["scheduled_at"]) for val_id, log in rows]
    assert len(ticks) == len(set(ticks))  # no tick ran twice


def _cron_rows(db_path: str) -> list[tuple[int, str]]:
    with closing(Store(db_path)) as store:
        return store._db.execute(
            "SELECT val_id, log FROM runs WHERE source = 'cron' AND error_type IS NULL"
        ).fetchall()


def _cron_count(db_path: str) -> int:
    return len(_cron_rows(db_path))
