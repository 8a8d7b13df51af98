"""Fair shares of the pool between users (docs/fairness.md): the bookkeeping as tables, the
pool's queueing and eviction with in-memory workers, then the outcomes through the real
server with real workers: a flooding user gets 429 naming the limit, another user's request
still succeeds."""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
from collections import Counter

import pytest
import trio

from runtime.config import Config, PoolConfig
from runtime.errors import TooManyRequestsError
from runtime.invoke import REFUSAL_HOLD_S
from runtime.pool import Pool, ValSpec, open_pool
from runtime.process import WorkerProcess
from runtime.shares import Shares
from sandbox.messages import HttpRequest
from tests.fakes.memory_worker import MemoryWorker
from tests.helpers import StartService, assert_json_error, counter_body, counter_spec

REQUEST = HttpRequest(0, "GET", "/", "/", "", ())


def shares(**held: int) -> Shares:
    table = Shares(max_workers=8, max_per_user=4, max_queued_per_user=2)
    for user, count in held.items():
        for _ in range(count):
            table.take(user)
    return table


@pytest.mark.parametrize(
    ("held", "oldest_idle", "asking", "evicted"),
    [
        # The user holding the most gives way, whoever asks.
        ({"flood": 6, "victim": 1}, {"flood": 5.0, "victim": 1.0}, "victim", "flood"),
        ({"flood": 6, "victim": 1}, {"flood": 5.0, "victim": 1.0}, "flood", "flood"),
        # A user holding fewer than the asker is never evicted for them: the asker's own go.
        ({"flood": 6, "victim": 1}, {"victim": 1.0}, "flood", None),
        ({"a": 2, "b": 2}, {"a": 1.0, "b": 2.0}, "b", "b"),
        ({"a": 3, "b": 2, "c": 3}, {"a": 9.0, "c": 1.0}, "b", "c"),  # equals: older idle
        ({"a": 2}, {}, "b", None),
    ],
)
def test_eviction_takes_from_the_user_most_over_their_share(
    held: dict[str, int], oldest_idle: dict[str, float], asking: str, evicted: str | None
) -> None:
    assert shares(**held).evict_from(asking, oldest_idle) == evicted


def test_a_free_slot_goes_to_the_waiting_user_holding_fewest_then_longest_waiting() -> None:
    table = shares(flood=3, victim=1)
    with (
        table.in_line("flood") as f1,
        table.in_line("flood") as f2,
        table.in_line("victim") as v1,
        table.in_line("other") as o1,
    ):
        # "other" holds none: first, though it came last.
        assert [table.first_in_line(u, t) for u, t in [("flood", f1), ("flood", f2)]] == [
            False,
            False,
        ]
        assert not table.first_in_line("victim", v1)
        assert table.first_in_line("other", o1)
    assert not table.waiting


def test_a_user_at_their_cap_is_not_in_line_for_free_slots() -> None:
    table = shares(capped=4)
    with table.in_line("capped") as ticket, table.in_line("small") as small:
        assert not table.first_in_line("capped", ticket)
        assert table.first_in_line("small", small)


def test_too_many_waiting_requests_of_one_user_are_429_naming_the_limit() -> None:
    table = shares()
    table.enqueue("flood")
    table.enqueue("flood")
    with pytest.raises(TooManyRequestsError) as refused:
        table.enqueue("flood")
    assert refused.value.details == {"limit": "pool.max_queued_per_user"}
    assert ("retry-after", "1") in refused.value.headers
    table.enqueue("victim")  # another user's queue is their own
    table.dequeue("flood")
    table.enqueue("flood")


def test_cold_starts_take_turns_at_the_users_rate() -> None:
    table = Shares(max_workers=8, max_per_user=4, max_queued_per_user=2, cold_starts_per_s=10)
    # A burst of one second's worth at once, then one turn every 0.1 s.
    assert [table.cold_start_wait("flood", 100.0, 5.0) for _ in range(10)] == [0.0] * 10
    assert [round(table.cold_start_wait("flood", 100.0, 5.0), 3) for _ in range(3)] == [
        0.1,
        0.2,
        0.3,
    ]
    assert table.cold_start_wait("victim", 100.0, 5.0) == 0.0  # another user's own bucket
    table.cold_start_refund("flood")  # the request went before its turn came
    assert round(table.cold_start_wait("flood", 100.0, 5.0), 3) == 0.3
    # A second later, ten more turns have come, three of them taken ahead already.
    waits = [round(table.cold_start_wait("flood", 101.0, 5.0), 3) for _ in range(8)]
    assert waits == [0.0] * 7 + [0.1]
    with pytest.raises(TooManyRequestsError) as refused:
        table.cold_start_wait("flood", 101.0, 0.15)  # the next turn is 0.2 s off
    assert refused.value.details == {"limit": "pool.cold_starts_per_user_per_s"}


# --- the pool, with in-memory workers --------------------------------------------------------


def spec(owner: str, val_id: int) -> ValSpec:
    return ValSpec(val_id, 1, owner, f"v{val_id}", "", (), f"{owner}-v.web.localhost")


async def in_memory_pool(
    nursery: trio.Nursery, delay_s: float, **pool: int | float
) -> tuple[Pool, list[MemoryWorker]]:
    made: list[MemoryWorker] = []

    async def factory() -> WorkerProcess:
        made.append(MemoryWorker(nursery, delay_s))
        return made[-1]

    return Pool(Config(pool=PoolConfig(**pool)), nursery, factory), made  # type: ignore[arg-type]


async def test_a_full_pool_serves_the_user_holding_fewest_next() -> None:
    done: list[str] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            pool, _made = await in_memory_pool(
                nursery, 0.05, max_workers=2, max_workers_per_user=2, load_timeout_s=20.0
            )

            async def call(owner: str, val_id: int) -> None:
                await pool.invoke(spec(owner, val_id), REQUEST)
                done.append(owner)

            async with trio.open_nursery() as calls:
                for val_id in range(30):  # a flood of cold vals: each needs a slot
                    calls.start_soon(call, "flood", val_id)
                while pool.shares.held["flood"] < 2:  # ASYNC110: polled, under fail_after
                    await trio.sleep(0.001)
                calls.start_soon(call, "victim", 1000)
            await pool.aclose()
            nursery.cancel_scope.cancel()
    # FIFO would serve the victim after the 28 flood requests waiting before it; the victim
    # holds no worker, so it is first for the next free slot.
    assert len(done) == 31
    assert done.index("victim") <= 4


async def test_a_tenant_cycling_through_many_vals_evicts_only_its_own_workers() -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            pool, _made = await in_memory_pool(nursery, 0.0, max_workers=4)
            await pool.invoke(spec("victim", 1), REQUEST)
            (victims_worker,) = pool.idle_workers()
            for round_ in range(3):
                for val_id in range(100, 170):  # 70 vals, more than the pool holds
                    await pool.invoke(spec("flood", val_id), REQUEST)
                await pool.invoke(spec("victim", 1), REQUEST)
                assert victims_worker in pool.idle_workers(), round_  # still warm
            assert pool.shares.held == Counter(flood=3, victim=1)
            await pool.aclose()
            nursery.cancel_scope.cancel()


async def test_a_user_at_their_cap_waits_for_their_own_workers_and_others_do_not() -> None:
    most_at_once = 0
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            pool, _made = await in_memory_pool(
                nursery, 0.2, max_workers=8, max_workers_per_user=2, load_timeout_s=20.0
            )
            victim_done = trio.Event()

            async def flood(val_id: int) -> None:
                nonlocal most_at_once
                await pool.invoke(spec("flood", val_id), REQUEST)
                most_at_once = max(most_at_once, pool.shares.held["flood"])

            async def victim() -> None:
                await pool.invoke(spec("victim", 1000), REQUEST)  # val ids are global
                victim_done.set()

            async with trio.open_nursery() as calls:
                for val_id in range(10):
                    calls.start_soon(flood, val_id)
                while pool.shares.held["flood"] < 2:  # ASYNC110: polled, under fail_after
                    await trio.sleep(0.001)
                calls.start_soon(victim)
                await victim_done.wait()
                # The victim was served while most of the flood still waited its turn.
                assert pool.shares.queued["flood"] >= 4
            await pool.aclose()
            nursery.cancel_scope.cancel()
    assert most_at_once == 2


async def test_a_tenant_cycling_fast_through_vals_waits_for_cold_start_turns() -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            pool, _made = await in_memory_pool(
                nursery, 0.0, max_workers=4, cold_starts_per_user_per_s=20.0
            )
            started = trio.current_time()
            for val_id in range(30):  # 30 cold starts: 20 at once, then one each 50 ms
                await pool.invoke(spec("flood", val_id), REQUEST)
            # However slow the machine, 30 turns at 20 a second take half a second.
            assert trio.current_time() - started >= 0.45
            delayed = pool.stats["cold_starts_delayed"]
            assert delayed >= 1
            await pool.invoke(spec("victim", 1000), REQUEST)  # the victim's own bucket
            assert pool.stats["cold_starts_delayed"] == delayed
            await pool.aclose()
            nursery.cancel_scope.cancel()


async def test_a_user_whose_workers_stay_busy_gets_429_naming_their_cap() -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            pool, _made = await in_memory_pool(
                nursery, 5.0, max_workers=8, max_workers_per_user=1, load_timeout_s=0.3
            )
            outcomes: Counter[str] = Counter()

            async def call(owner: str, val_id: int) -> None:
                try:
                    await pool.invoke(spec(owner, val_id), REQUEST)
                    outcomes[owner + " ok"] += 1
                except TooManyRequestsError as exc:
                    outcomes[f"{owner} 429 {exc.details['limit']}"] += 1

            with trio.move_on_after(2):
                async with trio.open_nursery() as calls:
                    calls.start_soon(call, "flood", 1)
                    calls.start_soon(call, "flood", 2)
            await pool.aclose()
            nursery.cancel_scope.cancel()
    assert outcomes == Counter({"flood 429 pool.max_workers_per_user": 1})


# --- through the real server, with real workers ----------------------------------------------

SLEEPY = """
import time
def sleepy(req):
    time.sleep(float(req.query.get("s", "0")))
    return "slept"
"""


async def test_a_flooding_user_gets_429_while_another_users_val_answers(
    start_service: StartService,
) -> None:
    service = await start_service(
        wall_time_s=30.0, max_workers_per_user=2, max_queued_per_user=4, max_workers_per_val=2
    )
    await service.put_val("sleepy", SLEEPY, user="alice")
    await service.put_val("sleepy", SLEEPY, user="bob")
    assert (await service.web("bob", "sleepy")).text == "slept"  # warm
    statuses: Counter[int] = Counter()
    refusals: list[dict[str, str]] = []

    async def flood() -> None:
        response = await service.web("alice", "sleepy", "/?s=3")
        statuses[response.status_code] += 1
        if response.status_code == 429:
            assert response.headers["retry-after"] == "1"
            refusals.append(assert_json_error(response, 429, "too_many_requests"))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(12):
                nursery.start_soon(flood)
            # ASYNC110: no event says the flood is in; poll until refusals come back.
            while not refusals:
                await trio.sleep(0.02)
            with trio.fail_after(10):  # not behind alice's 3 s requests
                victim = await service.web("bob", "sleepy")
            assert victim.status_code == 200
            assert victim.text == "slept"
    # 2 run and 4 wait (those starting a worker count as waiting until it is up): the
    # rest are refused at once, for all sleep 3 s and none frees a slot.
    assert statuses[200] + statuses[429] == 12
    assert 2 <= statuses[200] <= 6
    assert all("pool.max_queued_per_user" in error["message"] for error in refusals)
    assert all(error.get("limit") == "pool.max_queued_per_user" for error in refusals)


EVAL_SLEEP = "import time\ntime.sleep(3)\n1"


async def test_one_user_cannot_take_every_eval_slot(start_service: StartService) -> None:
    service = await start_service(wall_time_s=30.0, max_evals_per_user=2)
    statuses: Counter[int] = Counter()
    refusals: list[dict[str, str]] = []

    async def flood() -> None:
        response = await service.api("POST", "/v1/eval", user="alice", json={"code": EVAL_SLEEP})
        statuses[response.status_code] += 1
        if response.status_code == 429:
            refusals.append(assert_json_error(response, 429, "too_many_requests"))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(flood)
            while not refusals:  # ASYNC110: polled, under fail_after
                await trio.sleep(0.02)
            with trio.fail_after(15):
                other = await service.api("POST", "/v1/eval", user="bob", json={"code": "1 + 1"})
            assert other.status_code == 200, other.text
            assert other.json() == 2
    assert statuses == Counter({200: 2, 429: 4})
    assert all(error.get("limit") == "pool.max_evals_per_user" for error in refusals)


async def test_an_eval_over_the_cap_is_refused_before_its_body_is_read(
    start_service: StartService,
) -> None:
    # The cap is checked right after the token, before the body is parsed and the env read
    # (a trip to the store): a flood of refused Evals costs no store trips. A body that is
    # not even JSON shows the order: 429, not 400.
    service = await start_service(wall_time_s=30.0, max_evals_per_user=1)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(service.api, "POST", "/v1/eval", json={"code": EVAL_SLEEP})
            )
            while True:  # ASYNC110: polled until alice's one Eval runs, under fail_after
                asked = trio.current_time()
                bad = await service.api("POST", "/v1/eval", content=b"{not json")
                if bad.status_code == 429:
                    # Held as long as Retry-After says: a client that ignores it and asks
                    # again at once gets one refusal a second per connection.
                    assert trio.current_time() - asked >= REFUSAL_HOLD_S * 0.9
                    break
                assert bad.status_code == 400, bad.text
                await trio.sleep(0.02)
            error = assert_json_error(bad, 429, "too_many_requests")
            assert error.get("limit") == "pool.max_evals_per_user"
            assert bad.headers["retry-after"] == "1"
            # bob is not alice: his bad body is judged as a body.
            other = await service.api("POST", "/v1/eval", user="bob", content=b"{not json")
            assert_json_error(other, 400, "bad_json")


# --- each user's fork server has its own supply ----------------------------------------------


async def test_one_users_stopped_fork_server_stalls_nobody_else() -> None:
    # Each user's own fork server (the default), each with its own supply; a stopped one is
    # given up on after a third of the load timeout and replaced. Meanwhile alice's requests
    # hold at most her share of the four slots, and bob's cold starts go ahead.
    config = Config(
        pool=PoolConfig(
            prewarm_workers=1, load_timeout_s=9.0, max_workers=4, max_workers_per_user=2
        )
    )
    done: list[str] = []
    with trio.fail_after(60):
        async with open_pool(config) as pool:
            assert await counter_body(pool, counter_spec(1)) == b"1"  # alice's fork server
            assert await counter_body(pool, dataclasses.replace(counter_spec(2), owner="bob"))
            assert pool.tenants is not None
            alices = pool.tenants.fork_server("alice")
            assert alices is not None
            assert alices.server is not None
            os.kill(alices.server.process.pid, signal.SIGSTOP)

            async def call(owner: str, val_id: int) -> None:
                val = dataclasses.replace(counter_spec(val_id), owner=owner)
                assert await counter_body(pool, val) == b"1"
                done.append(owner)

            async with trio.open_nursery() as nursery:
                for val_id in range(10, 14):  # cold: each needs a new worker
                    nursery.start_soon(call, "alice", val_id)
                while pool.shares.held["alice"] < 2:  # ASYNC110: polled, under fail_after
                    await trio.sleep(0.01)
                for val_id in range(20, 24):
                    await call("bob", val_id)
            supplies = {pool.tenants.supply("alice"), pool.tenants.supply("bob")}
            assert None not in supplies
            assert len(supplies) == 2
            assert not pool.supply.failing  # nor does /healthz notice one user's trouble
    # Bob's four cold starts came before alice's fork server was replaced; then alice's ran.
    assert done == ["bob"] * 4 + ["alice"] * 4
