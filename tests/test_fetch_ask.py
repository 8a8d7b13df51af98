"""The ask path itself, driven by a fake worker: an ask is answered inside the invocation, and
a worker that asks for another invocation, or sends an ask nobody here answers, or a malformed
one, is killed with 502 protocol_error, and the pool recovers."""

from __future__ import annotations

import json

import pytest
import trio

from runtime.broker import Broker
from runtime.config import FetchConfig
from runtime.errors import HTTPError
from runtime.fetch import open_fetcher
from runtime.pool import Pool, open_pool
from runtime.reply import ValResponse
from sandbox.messages import FetchAsk
from tests.helpers import HOSTILE_CONFIG as CONFIG
from tests.helpers import HOSTILE_SPEC as SPEC
from tests.helpers import HOSTILE_WORKER as FAKE
from tests.helpers import hostile_ok as ok
from tests.helpers import hostile_request as request


async def ask(pool: Pool, path: str) -> dict[str, object]:
    reply = await pool.invoke(SPEC, request(path))
    assert isinstance(reply.outcome, ValResponse)
    answer: dict[str, object] = json.loads(reply.outcome.body)
    return answer


async def test_an_ask_is_answered_while_the_invocation_runs() -> None:
    with trio.fail_after(20):
        async with (
            open_pool(CONFIG, worker_command=FAKE) as pool,
            open_fetcher(FetchConfig()) as fetcher,
        ):
            pool.broker = Broker({FetchAsk: fetcher.answer}).answer
            answer = await ask(pool, "/ask")
    assert answer["op"] == "fetched"
    assert answer["status"] == 0
    assert "10.0.0.1, which is private" in str(answer["error"])
    assert fetcher.outcomes["blocked"] == 1


@pytest.mark.parametrize(
    ("path", "handlers"),
    [
        ("/ask-wrong-id", True),  # an ask for an invocation that is not running
        ("/ask-malformed", True),
        ("/ask", False),  # an ask kind this front end has no handler for
        ("/ask-unknown-kind", True),  # an op that is no message at all
    ],
)
async def test_a_worker_that_abuses_the_ask_path_is_killed(path: str, handlers: bool) -> None:
    with trio.fail_after(20):
        async with (
            open_pool(CONFIG, worker_command=FAKE) as pool,
            open_fetcher(FetchConfig()) as fetcher,
        ):
            pool.broker = Broker({FetchAsk: fetcher.answer} if handlers else {}).answer
            with pytest.raises(HTTPError) as caught:
                await pool.invoke(SPEC, request(path))
            assert (caught.value.status, caught.value.type) == (502, "protocol_error")
            assert pool.stats["killed_protocol_error"] == 1
            assert await ok(pool) == b"ok"
            assert pool.stats["cold_starts"] == 2  # the liar was never reused
    assert sum(fetcher.outcomes.values()) == 0  # nothing was fetched for it
