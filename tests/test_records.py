"""Invocation records (docs/contract.md §10): the recorder against a real SQLite store, and
what every web, run and eval invocation leaves, through the real server."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import pytest
import trio

from runtime.masking import mask_secrets
from runtime.records import Recorder, open_recorder
from runtime.store import AsyncStore, Record, Store, ValVersion
from tests.helpers import Service, StartService, assert_json_error, configured_service, valrun

P = ParamSpec("P")
R = TypeVar("R")


# Keeping env values out (pure)


@pytest.mark.parametrize(
    ("text", "env", "masked"),
    [
        ("key=abc123!", [("API", "abc123")], "key=[env API]!"),
        ("abc123 and abc123", [("API", "abc123")], "[env API] and [env API]"),
        ("mode on", [("MODE", "on")], "mode on"),  # too short to mask without garbling logs
        ("secret-long", [("A", "secret"), ("B", "secret-long")], "[env B]"),
        ("nothing here", [("API", "abc123")], "nothing here"),
        ("", [], ""),
    ],
)
def test_env_values_are_masked(text: str, env: list[tuple[str, str]], masked: str) -> None:
    assert mask_secrets(text, env) == masked


# The recorder, against a real store


@pytest.fixture
def store(store_location: str) -> Iterator[Store]:
    store = Store(store_location)
    store.create_user("alice")
    yield store
    store.close()


def a_val(store: Store, name: str = "hello") -> ValVersion:
    val, _ = store.put_val("alice", name, f"def {name}(req):\n    return 1", None)
    return val


def record(val: ValVersion | None, log: str = "", **changes: Any) -> Record:
    made = Record(
        val_id=val.val_id if val else None,
        owner="alice",
        source="web" if val else "eval",
        version=val.version if val else None,
        started_at=1.0,
        duration_ms=2.0,
        status=200,
        log=log,
    )
    return replace(made, **changes)


class ObservedStore(AsyncStore):
    """An AsyncStore that lets a test wait for, and hold up, the recorder's writes."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.written = trio.Event()
        self.writing = trio.Event()
        self.proceed: trio.Event | None = None

    async def call(
        self, method: Callable[Concatenate[Store, P], R], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        if method is Store.add_records:
            self.writing.set()
            if self.proceed is not None:
                await self.proceed.wait()
        result = await super().call(method, *args, **kwargs)
        if method is Store.add_records:
            self.written.set()
        return result


def logs(store: Store, val: ValVersion) -> list[str]:
    return [r.log for r in store.records(val, 100)]


async def test_records_wait_in_memory_until_flushed(store: Store) -> None:
    val = a_val(store)
    recorder = Recorder(AsyncStore(store), keep_per_val=10)
    recorder.add(record(val, "first"))
    recorder.add(record(val, "second"))
    assert (recorder.pending, logs(store, val)) == (2, [])
    await recorder.flush()
    assert (recorder.pending, logs(store, val)) == (0, ["second", "first"])  # newest first


async def test_a_full_batch_is_written_without_waiting_for_the_interval(
    store: Store, nursery: trio.Nursery
) -> None:
    val = a_val(store)
    observed = ObservedStore(store)
    recorder = Recorder(observed, keep_per_val=10, flush_interval_s=3600, batch_size=3)
    await nursery.start(recorder.serve)
    for n in range(3):
        recorder.add(record(val, str(n)))
    with trio.fail_after(5):
        await observed.written.wait()
    assert logs(store, val) == ["2", "1", "0"]


async def test_a_lone_record_is_written_after_the_interval(
    store: Store, nursery: trio.Nursery
) -> None:
    val = a_val(store)
    observed = ObservedStore(store)
    recorder = Recorder(observed, keep_per_val=10, flush_interval_s=0.05, batch_size=100)
    await nursery.start(recorder.serve)
    recorder.add(record(val, "alone"))
    with trio.fail_after(5):
        await observed.written.wait()
    assert logs(store, val) == ["alone"]


async def test_a_reader_flush_waits_for_a_write_in_progress(
    store: Store, nursery: trio.Nursery
) -> None:
    # The guarantee behind "flush, then read": a background write that took the queue and is
    # not yet committed must not let a reader's flush return early.
    val = a_val(store)
    observed = ObservedStore(store)
    observed.proceed = trio.Event()
    recorder = Recorder(observed, keep_per_val=10)
    recorder.add(record(val, "in flight"))
    nursery.start_soon(recorder.flush)
    with trio.fail_after(5):
        await observed.writing.wait()
    reader_done = trio.Event()

    async def reader() -> None:
        await recorder.flush()
        reader_done.set()

    nursery.start_soon(reader)
    await trio.testing.wait_all_tasks_blocked()
    assert not reader_done.is_set()
    observed.proceed.set()
    with trio.fail_after(5):
        await reader_done.wait()
    assert logs(store, val) == ["in flight"]


async def test_retention_keeps_the_newest_per_val_and_per_eval_user(store: Store) -> None:
    hello, other = a_val(store, "hello"), a_val(store, "other")
    recorder = Recorder(AsyncStore(store), keep_per_val=3)
    for n in range(5):
        recorder.add(record(hello, f"h{n}"))
        recorder.add(record(None, f"e{n}"))
        recorder.add(record(None, f"anon{n}", owner=None))
    recorder.add(record(other, "o0"))
    await recorder.flush()
    assert logs(store, hello) == ["h4", "h3", "h2"]
    assert logs(store, other) == ["o0"]
    assert [r.log for r in store.eval_records("alice", 100)] == ["e4", "e3", "e2"]
    anonymous = "SELECT log FROM runs WHERE val_id IS NULL AND user_id IS NULL ORDER BY id"
    assert [log for (log,) in store._db.execute(anonymous)] == ["anon2", "anon3", "anon4"]


async def test_the_queue_is_bounded_and_says_what_it_dropped(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    val = a_val(store)
    recorder = Recorder(AsyncStore(store), keep_per_val=10, max_pending=3)
    for n in range(5):
        recorder.add(record(val, str(n)))
    assert recorder.pending == 3
    with caplog.at_level(logging.WARNING, logger="runtime.records"):
        await recorder.flush()
    assert logs(store, val) == ["4", "3", "2"]
    assert "dropped 2 invocation records" in caplog.text


async def test_records_of_a_val_deleted_before_the_write_go_with_it(store: Store) -> None:
    val = a_val(store)
    recorder = Recorder(AsyncStore(store), keep_per_val=10)
    recorder.add(record(val, "orphan"))
    store.delete_val("alice", "hello")
    await recorder.flush()
    (count,) = store._db.execute("SELECT COUNT(*) FROM runs").fetchone()
    assert count == 0


async def test_a_store_that_fails_is_logged_not_raised(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    val = a_val(store)
    recorder = Recorder(AsyncStore(store), keep_per_val=10)
    recorder.add(record(val, "lost"))
    store.close()
    with caplog.at_level(logging.ERROR, logger="runtime.records"):
        await recorder.flush()
    assert "could not write 1 invocation records" in caplog.text
    assert recorder.pending == 0


async def test_closing_the_recorder_writes_what_is_queued(store: Store) -> None:
    val = a_val(store)
    async with open_recorder(AsyncStore(store), keep_per_val=10) as recorder:
        recorder.add(record(val, "at shutdown"))
    assert logs(store, val) == ["at shutdown"]


# Through the real server

HELLO = """
def hello(req=None):
    print("hello log", req.method if req else "run")
    return {"ok": True}
"""


async def runs(service: Service, val: str = "hello", user: str = "alice") -> list[dict[str, Any]]:
    response = await service.api("GET", f"/v1/vals/{user}/{val}/runs", user=user)
    assert response.status_code == 200, response.text
    result: list[dict[str, Any]] = response.json()["runs"]
    return result


async def test_web_and_run_invocations_leave_records(service: Service) -> None:
    await service.put_val("hello", HELLO)
    await service.put_val("hello", HELLO + "\n# v2\n")
    with trio.fail_after(15):
        started = time.time()
        await service.web("alice", "hello", "/?v=1")
        await service.api("POST", "/v1/run/alice.hello")
        records = await runs(service)  # no waiting: a read writes what is queued first
    run, web = records  # newest first
    assert (web["source"], web["version"], web["status"]) == ("web", 1, 200)
    assert (run["source"], run["version"], run["status"]) == ("run", 2, 200)
    assert (web["log"], run["log"]) == ("hello log GET\n", "hello log run\n")
    assert web["error"] is None
    assert run["error"] is None
    assert started <= web["time"] <= run["time"] <= time.time()
    assert 0 < web["duration_ms"] < 15_000


async def test_a_failed_invocation_records_its_error(service: Service) -> None:
    await service.put_val("boom", "def boom(req):\n    print('about to fail')\n    1 / 0\n")
    with trio.fail_after(15):
        await service.web("alice", "boom")
        (record,) = await runs(service, "boom")
    assert record["status"] == 502
    assert (record["method"], record["path"]) == ("GET", "/")
    assert record["log"] == "about to fail\n"
    assert record["error"] == {
        "type": "val_error",
        "message": "ZeroDivisionError: division by zero (line 3, in boom)",
        "traceback": ["line 3, in boom"],
    }


async def test_eval_records_are_the_token_users_own(service: Service) -> None:
    with trio.fail_after(15):
        await service.api("POST", "/v1/eval", json={"code": "print('evaluating')\n6 * 7"})
        mine = (await service.api("GET", "/v1/me/evals")).json()["runs"]
        bobs = (await service.api("GET", "/v1/me/evals", user="bob")).json()["runs"]
    assert [(r["source"], r["status"], r["log"], r["version"]) for r in mine] == [
        ("eval", 200, "evaluating\n", None)
    ]
    assert bobs == []


async def test_records_hold_no_request_body_and_no_env_value(service: Service) -> None:
    await service.api("PUT", "/v1/env/SECRET", content=b"hunter2-secret")
    await service.put_val(
        "leaky",
        """
def leaky(req):
    print("the secret is", env["SECRET"])
    if req.query.get("fail"):
        raise ValueError("bad key " + env["SECRET"])
    return {"length": len(req.body)}
""",
    )
    with trio.fail_after(15):
        await service.web("alice", "leaky", "/", "POST", content=b"BODY-MARKER")
        failed = await service.web("alice", "leaky", "/?fail=1")
        records = await runs(service, "leaky")
    error = assert_json_error(failed, 502, "val_error")
    assert "hunter2" not in failed.text
    assert "[env SECRET]" in error["message"]
    text = json.dumps(records)
    assert "hunter2" not in text
    assert "BODY-MARKER" not in text
    assert [r["log"] for r in records] == ["the secret is [env SECRET]\n"] * 2
    assert records[0]["error"]["message"].startswith("ValueError: bad key [env SECRET]")


async def test_the_recorded_log_is_capped_and_marked(start_service: StartService) -> None:
    service = await start_service(max_log_bytes=100)
    await service.put_val("chatty", "def chatty(req):\n    print('x' * 1000)\n    return 'ok'")
    with trio.fail_after(15):
        await service.web("alice", "chatty")
        (record,) = await runs(service, "chatty")
    assert record["log"] == "x" * 100 + "\n[log truncated at 100 bytes]"


async def test_retention_per_val_is_configurable(tmp_path: Path) -> None:
    async with configured_service(tmp_path, store={"max_runs_per_val": 3}) as service:
        await service.put_val("echo", "def echo(n):\n    print(n)\n    return n")
        with trio.fail_after(15):
            for n in range(5):
                await service.api("GET", f"/v1/run/alice.echo?args=[{n}]")
            records = await runs(service, "echo")
    assert [r["log"] for r in records] == ["4\n", "3\n", "2\n"]


async def test_records_are_written_when_the_server_stops(tmp_path: Path) -> None:
    async with configured_service(tmp_path) as service:
        await service.put_val("hello", HELLO)
        with trio.fail_after(15):
            assert (await service.web("alice", "hello")).status_code == 200
    store = Store(service.db_path)
    try:
        val = store.get_val("alice", "hello", None)
        assert val is not None
        assert [r.log for r in store.records(val, 10)] == ["hello log GET\n"]
    finally:
        store.close()


async def test_a_deleted_vals_records_go_with_it(service: Service) -> None:
    await service.put_val("hello", HELLO)
    with trio.fail_after(15):
        await service.web("alice", "hello")
        assert len(await runs(service)) == 1
        await service.api("DELETE", "/v1/vals/alice/hello")
        await service.put_val("hello", HELLO)
        assert await runs(service) == []


async def test_runs_limit(service: Service) -> None:
    await service.put_val("hello", HELLO)
    with trio.fail_after(15):
        for _ in range(3):
            await service.web("alice", "hello")
        limited = await service.api("GET", "/v1/vals/alice/hello/runs?limit=2")
        bad = await service.api("GET", "/v1/vals/alice/hello/runs?limit=0")
    assert len(limited.json()["runs"]) == 2
    assert_json_error(bad, 400, "bad_request")


async def test_cli_logs_prints_a_vals_records(service: Service) -> None:
    await service.put_val("hello", HELLO)
    with trio.fail_after(15):
        await service.web("alice", "hello")
    done = await valrun(service, "logs", "--token", service.tokens["alice"], "alice/hello")
    assert done.returncode == 0, done.stderr
    first, log_line = done.stdout.decode().splitlines()
    assert first.split()[2:7] == ["web", "v1", "GET", "/", "200"]
    assert log_line == "  | hello log GET"


async def test_what_a_module_prints_while_loading_is_in_its_first_record(
    service: Service,
) -> None:
    await service.put_val(
        "loud", "print('loading')\ndef loud(req):\n    print('serving')\n    return 1"
    )
    await service.put_val("broken", "print('about to fail')\nraise ValueError('no')\nbroken = 1\n")
    with trio.fail_after(15):
        await service.web("alice", "loud")
        await service.web("alice", "loud")
        assert_json_error(await service.web("alice", "broken"), 502, "val_error")
        second, first = await runs(service, "loud")
        (failed,) = await runs(service, "broken")
    assert (first["log"], second["log"]) == ("loading\nserving\n", "serving\n")
    assert failed["log"] == "about to fail\n"
