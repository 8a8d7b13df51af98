"""The pool's wake-ups when it is full: every waiter is woken when room is made.

In-memory workers (tests/fakes/memory_worker.py), so hundreds of vals cost nothing and the
test measures the pool's own bookkeeping.
"""

from __future__ import annotations

from collections import Counter

import trio

from runtime.config import Config, PoolConfig
from runtime.errors import HTTPError
from runtime.pool import Pool, ValSpec
from runtime.process import WorkerProcess
from sandbox.messages import HttpRequest
from tests.fakes.memory_worker import MemoryWorker

REQUEST = HttpRequest(0, "GET", "/", "/", "", ())


def spec(val_id: int) -> ValSpec:
    return ValSpec(val_id, 1, "alice", f"v{val_id}", "", (), "alice-v.web.localhost")


async def call_all(pool: Pool, vals: int) -> Counter[str]:
    outcomes: Counter[str] = Counter()

    async def call(val_id: int) -> None:
        try:
            await pool.invoke(spec(val_id), REQUEST)
            outcomes["ok"] += 1
        except HTTPError as exc:
            outcomes[exc.type] += 1

    async with trio.open_nursery() as nursery:
        for val_id in range(vals):
            nursery.start_soon(call, val_id)
    return outcomes


async def run_pool(max_workers: int, vals: int, delay_s: float) -> Counter[str]:
    # One user's vals, that user's limits lifted: the pool's own wake-ups are under test
    # here (its fair shares between users: test_fairness.py).
    pool_config = PoolConfig(
        max_workers=max_workers,
        load_timeout_s=5.0,
        max_workers_per_user=max_workers,
        max_queued_per_user=vals,
        cold_starts_per_user_per_s=10_000.0,
    )
    config = Config(pool=pool_config)
    async with trio.open_nursery() as nursery:

        async def factory() -> WorkerProcess:
            return MemoryWorker(nursery, delay_s)

        pool = Pool(config, nursery, factory)
        outcomes = await call_all(pool, vals)
        await pool.aclose()
        nursery.cancel_scope.cancel()
    return outcomes


async def test_one_worker_serves_every_waiting_val_in_turn() -> None:
    # 20 vals, room for one warm worker: each waits for the one before it. With a wake-up
    # that each waiter replaced, only the newest waiter woke and the rest got 503 after 5 s.
    with trio.fail_after(30):
        assert await run_pool(max_workers=1, vals=20, delay_s=0.01) == Counter(ok=20)


async def test_500_vals_at_once_share_64_workers_without_false_overload() -> None:
    with trio.fail_after(60):
        assert await run_pool(max_workers=64, vals=500, delay_s=0.02) == Counter(ok=500)
