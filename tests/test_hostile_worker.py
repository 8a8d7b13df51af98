"""A worker that lies, floods, hangs or dies costs exactly its own request a 502 (or 504).

The pool is driven with a fake worker (tests/fakes/hostile_worker.py) spawned directly; each
case breaks the protocol one way, then a normal request proves the pool recovered.
"""

from __future__ import annotations

from dataclasses import replace
from typing import cast

import pytest
import trio

from runtime.config import LimitsConfig
from runtime.errors import HTTPError
from runtime.pool import ValSpec, open_pool
from runtime.reply import ValResponse
from runtime.savecheck import SaveChecks
from runtime.store import AsyncStore
from tests.helpers import HOSTILE_CONFIG as CONFIG
from tests.helpers import HOSTILE_SPEC as SPEC
from tests.helpers import HOSTILE_WORKER as FAKE
from tests.helpers import hostile_ok as ok
from tests.helpers import hostile_request as request


@pytest.mark.parametrize(
    ("path", "status", "error_type"),
    [
        ("/garbage", 502, "protocol_error"),
        ("/not-an-object", 502, "protocol_error"),
        ("/huge-head", 502, "protocol_error"),
        ("/huge-body", 502, "response_too_large"),
        ("/wrong-id", 502, "protocol_error"),
        ("/string-id", 502, "protocol_error"),
        ("/bad-status", 502, "bad_response"),
        ("/unknown-op", 502, "protocol_error"),
        ("/fake-error-type", 502, "protocol_error"),
        ("/half-then-hang", 504, "timeout"),
        ("/exit-mid-reply", 502, "worker_crashed"),
        ("/silent-exit", 502, "worker_crashed"),
        ("/bad-storage-ask", 502, "protocol_error"),
        ("/ask-for-another-request", 502, "protocol_error"),
        ("/flood", 502, "protocol_error"),
    ],
)
async def test_hostile_worker_costs_one_error_and_the_pool_recovers(
    path: str, status: int, error_type: str
) -> None:
    with trio.fail_after(20):
        async with open_pool(CONFIG, worker_command=FAKE) as pool:
            assert await ok(pool) == b"ok"
            with pytest.raises(HTTPError) as caught:
                await pool.invoke(SPEC, request(path))
            assert (caught.value.status, caught.value.type) == (status, error_type)
            assert pool.stats[f"killed_{error_type}"] == 1
            assert await ok(pool) == b"ok"
            assert pool.stats["cold_starts"] == 2  # the liar was never reused


async def test_hostile_worker_does_not_delay_another_vals_request() -> None:
    other = ValSpec(2, 1, "bob", "fake", "unused", (), "bob-fake.web.localhost")
    config = replace(CONFIG, limits=LimitsConfig(wall_time_s=10.0))  # the hang lasts 10 s
    with trio.fail_after(30):
        async with open_pool(config, worker_command=FAKE) as pool, trio.open_nursery() as nursery:
            nursery.start_soon(pool.invoke, SPEC, request("/half-then-hang"))
            await trio.sleep(0.2)
            started = trio.current_time()
            reply = await pool.invoke(other, request("/ok"))
            assert isinstance(reply.outcome, ValResponse)
            assert trio.current_time() - started < 3.0  # a fresh spawn, not the 10 s hang
            nursery.cancel_scope.cancel()


class _NoStore:
    """SaveChecks looks the val up to learn its spelling; these vals are all new."""

    async def call(self, *args: object) -> None:
        return None


@pytest.mark.parametrize(
    ("name", "status", "error_type"),
    [("ok", None, None), ("lying", 502, "protocol_error"), ("crash", 400, "bad_code")],
)
async def test_hostile_check_worker_costs_one_save(
    name: str, status: int | None, error_type: str | None
) -> None:
    with trio.fail_after(20):
        async with open_pool(CONFIG, worker_command=FAKE) as pool:
            checks = SaveChecks(CONFIG, pool, cast(AsyncStore, _NoStore()))
            if status is None:
                await checks.check("alice", name, "code")
            else:
                with pytest.raises(HTTPError) as caught:
                    await checks.check("alice", name, "code")
                assert (caught.value.status, caught.value.type) == (status, error_type)
            await checks.check("alice", "ok", "code")  # the next save is checked normally
            assert await ok(pool) == b"ok"
