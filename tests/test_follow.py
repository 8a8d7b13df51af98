"""Live logs: `GET .../runs?after=ID&wait=S` (long polling) through the real server, and
`valrun logs USER/VAL --follow` as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from runtime.config import Config, ServerConfig, StoreConfig
from runtime.errors import BadRequestError
from runtime.follow import MAX_FOLLOWERS_PER_USER, MAX_WAIT_S, Follow, Followers, parse_follow
from runtime.records import Recorder
from runtime.server import serve_valrun
from runtime.store import AsyncStore, Record, Store
from tests.helpers import TEST_LIMITS, Service, assert_json_error, write_config

FAIL = """\
def fail(req=None):
    print('about to fail')
    return helper()

def helper():
    return 1 / 0
"""


@pytest.mark.parametrize(
    ("query", "follow"),
    [
        ("", Follow(None, 0)),
        ("after=0", Follow(0, 0)),
        ("after=12&wait=30", Follow(12, 30)),
        ("limit=5&after=3&wait=0", Follow(3, 0)),
    ],
)
def test_parse_follow(query: str, follow: Follow) -> None:
    assert parse_follow(query) == follow


@pytest.mark.parametrize(
    "query", ["wait=5", "after=-1", "after=x", "after=1&wait=31", "after=1&wait=1.5"]
)
def test_parse_follow_refuses_what_it_cannot_honour(query: str) -> None:
    with pytest.raises(BadRequestError):
        parse_follow(query)


async def runs(service: Service, query: str, user: str = "alice") -> httpx.Response:
    return await service.api("GET", f"/v1/vals/alice/fail/runs?{query}", user=user)


async def test_a_waiting_read_answers_when_the_next_record_arrives(service: Service) -> None:
    await service.put_val("fail", FAIL)
    with trio.fail_after(20):
        await service.web("alice", "fail", "/first?token=secret")
        (first,) = (await runs(service, "")).json()["runs"]
        assert (first["method"], first["path"], first["status"]) == ("GET", "/first", 502)
        answered: list[httpx.Response] = []
        async with trio.open_nursery() as nursery:

            async def follow() -> None:
                answered.append(await runs(service, f"after={first['id']}&wait={MAX_WAIT_S}"))

            nursery.start_soon(follow)
            # Whether the wait begins before or after this invocation, it answers with it.
            await service.api("POST", "/v1/run/alice.fail", content=b"[]")
    (response,) = answered
    assert response.status_code == 200, response.text
    (record,) = response.json()["runs"]
    assert record["id"] > first["id"]
    assert (record["source"], record["method"], record["path"]) == (
        "run",
        "POST",
        "/v1/run/alice.fail",
    )
    assert record["status"] == 502
    assert record["log"] == "about to fail\n"
    assert record["error"]["traceback"] == ["line 3, in fail", "line 6, in helper"]


async def test_after_answers_the_newer_records_oldest_first(service: Service) -> None:
    await service.put_val("fail", FAIL)
    with trio.fail_after(20):
        for path in ("/1", "/2", "/3"):
            await service.web("alice", "fail", path)
        newest_first = (await runs(service, "")).json()["runs"]
        oldest = newest_first[-1]["id"]
        newer = (await runs(service, f"after={oldest}")).json()["runs"]
    assert [r["path"] for r in newest_first] == ["/3", "/2", "/1"]
    assert [r["path"] for r in newer] == ["/2", "/3"]


async def test_a_wait_with_nothing_new_answers_empty(service: Service) -> None:
    await service.put_val("fail", FAIL)
    with trio.fail_after(20):
        response = await runs(service, "after=0&wait=1")
    assert (response.status_code, response.json()) == (200, {"runs": []})


async def followers(service: Service) -> int:
    return int((await service.api("GET", "/healthz", user=None)).json()["log_followers"])


async def test_followers_per_user_are_limited(service: Service) -> None:
    await service.put_val("fail", FAIL)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for _ in range(MAX_FOLLOWERS_PER_USER):
                nursery.start_soon(runs, service, f"after=0&wait={MAX_WAIT_S}")
            while await followers(service) < MAX_FOLLOWERS_PER_USER:
                pass  # each check is a request: the waits above reach the server meanwhile
            refused = await runs(service, f"after=0&wait={MAX_WAIT_S}")
            assert_json_error(refused, 429, "too_many_requests")
            assert refused.headers["retry-after"] == "1"
            # Another user is not held up by alice's waits, and a record ends them all.
            bobs = await service.api("GET", "/v1/me/evals?after=0&wait=1", user="bob")
            assert bobs.status_code == 200
            await service.web("alice", "fail")
        assert await followers(service) == 0


async def test_eval_records_can_be_followed(service: Service) -> None:
    with trio.fail_after(20):
        answered: list[httpx.Response] = []
        async with trio.open_nursery() as nursery:

            async def follow() -> None:
                answered.append(await service.api("GET", f"/v1/me/evals?after=0&wait={MAX_WAIT_S}"))

            nursery.start_soon(follow)
            await service.api("GET", "/v1/eval/6*7")
    (record,) = answered[0].json()["runs"]
    assert (record["source"], record["method"], record["path"], record["status"]) == (
        "eval",
        "GET",
        "/v1/eval/…",  # Eval's code is a payload: never in a record
        200,
    )


async def test_records_of_others_cannot_be_followed(service: Service) -> None:
    await service.put_val("fail", FAIL)
    response = await runs(service, "after=0&wait=5", user="bob")
    assert_json_error(response, 403, "forbidden")


async def test_cli_logs_follow_prints_records_as_they_happen(
    service: Service, tmp_path: Path
) -> None:
    await service.put_val("fail", FAIL)
    write_config(tmp_path, service)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VALRUN_")}
    environ["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    environ["VALRUN_TOKEN"] = service.tokens["alice"]
    command = [sys.executable, "-m", "runtime.cli", "logs", "alice/fail", "--follow", "--json"]
    with trio.fail_after(30):
        process = await trio.lowlevel.open_process(
            command, cwd=tmp_path, env=environ, stdout=subprocess.PIPE
        )
        assert process.stdout is not None
        try:
            lines: list[dict[str, object]] = []
            buffer = b""
            path = 0
            # Invoke until the follower has printed two records: it may have started
            # following before or after any one invocation, and must print each once.
            while len(lines) < 2:
                path += 1
                await service.web("alice", "fail", f"/p{path}")
                with trio.move_on_after(2):
                    while b"\n" not in buffer:
                        chunk = await process.stdout.receive_some()
                        assert chunk, "logs --follow exited"
                        buffer += chunk
                while b"\n" in buffer:
                    line, _, buffer = buffer.partition(b"\n")
                    lines.append(json.loads(line))
        finally:
            process.send_signal(signal.SIGINT)
            await process.wait()
    paths = [record["path"] for record in lines]
    assert len(set(paths)) == len(paths)  # no record twice
    assert paths == sorted(paths, key=lambda p: int(str(p)[2:]))  # in order
    assert all(record["status"] == 502 for record in lines)


async def test_a_waiting_read_answers_at_once_when_the_service_stops(tmp_path: Path) -> None:
    # Graceful shutdown waits for in-flight requests (here up to 25 s): a long poll must not
    # hold it up until its own wait ends.
    config = Config(
        server=ServerConfig(bind=("127.0.0.1:0",), shutdown_timeout_s=25.0),
        store=StoreConfig(url=f"sqlite:///{tmp_path / 'valrun.db'}"),
        limits=TEST_LIMITS,
    )
    db = Store(tmp_path / "valrun.db")
    token = db.create_user("alice")
    db.close()
    stop = trio.Event()
    answered: list[httpx.Response] = []
    headers = {"host": "api.localhost", "authorization": f"Bearer {token}"}
    with trio.fail_after(20):
        async with (
            httpx.AsyncClient(headers=headers, timeout=30) as client,
            trio.open_nursery() as nursery,
        ):
            urls = await nursery.start(partial(serve_valrun, config, shutdown_trigger=stop.wait))
            base = urls[0].replace("0.0.0.0", "127.0.0.1")

            async def follow() -> None:
                answered.append(await client.get(f"{base}/v1/me/evals?after=0&wait={MAX_WAIT_S}"))

            nursery.start_soon(follow)
            while (await client.get(f"{base}/healthz")).json()["log_followers"] < 1:
                pass
            stop.set()
    (response,) = answered
    assert (response.status_code, response.json()) == (200, {"runs": []})


async def test_a_wait_that_ends_without_a_record_leaves_no_event_behind(tmp_path: Path) -> None:
    store = Store(tmp_path / "valrun.db")
    recorder = Recorder(AsyncStore(store), keep_per_val=10)
    followers = Followers(recorder)

    async def nothing() -> list[Record]:
        return []

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for user in ("alice", "bob"):  # two waits on one key: the event outlives the first
                nursery.start_soon(followers.fetch, user, ("val", 1), Follow(0, 1), nothing)
    assert (followers.waiting, recorder.watched) == (0, 0)
    store.close()
