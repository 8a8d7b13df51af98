"""Start the whole service: store, worker pool, invocation recorder, and hypercorn's trio
server around the app."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import closing

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from runtime.app import App
from runtime.config import Config
from runtime.metrics import Metrics
from runtime.pool import open_pool
from runtime.records import open_recorder
from runtime.scheduler import Scheduler, serve_scheduler
from runtime.store import AsyncStore, Store

logger = logging.getLogger(__name__)


def hypercorn_config(config: Config) -> HypercornConfig:
    hconfig = HypercornConfig()
    hconfig.bind = list(config.server.bind)
    hconfig.graceful_timeout = config.server.shutdown_timeout_s
    hconfig.accesslog = None  # valrun writes its own access line (runtime.app)
    hconfig.errorlog = logging.getLogger("hypercorn.error")  # through our logging setup
    hconfig.include_server_header = False
    # The front end enforces its own body limit with a clear 413; hypercorn's is a backstop.
    hconfig.h11_max_incomplete_size = 64 * 1024
    return hconfig


async def serve_valrun(
    config: Config,
    *,
    shutdown_trigger: Callable[..., Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run valrun until `shutdown_trigger` returns (or forever); report the bound URLs."""
    # Two connections: the recorder's batch writes (~4 ms each) must not hold up the token
    # checks and val lookups that requests wait on; SQLite's WAL lets those read meanwhile.
    # A third for the scheduler: its claims and leases never queue behind either.
    with (
        closing(Store(config.store.sqlite_path)) as store,
        closing(Store(config.store.sqlite_path)) as records_store,
        closing(Store(config.store.sqlite_path)) as schedule_store,
    ):
        async_store = AsyncStore(store)
        async with (
            open_pool(config) as pool,
            # Inside the pool: at shutdown the server finishes its requests, then the
            # recorder writes what they recorded, then the workers stop.
            open_recorder(
                AsyncStore(records_store), keep_per_val=config.store.max_runs_per_val
            ) as recorder,
        ):
            app = App(config, async_store, pool, recorder, Metrics())
            async with trio.open_nursery() as nursery:
                scheduler: Scheduler | None = None
                if config.schedule.enabled:
                    scheduler = await nursery.start(
                        serve_scheduler, config, AsyncStore(schedule_store), app.runner, app.metrics
                    )

                async def stop_when_triggered() -> None:
                    await (shutdown_trigger or trio.sleep_forever)()
                    if scheduler is not None:
                        scheduler.stop()  # no new ticks; runs in progress go on meanwhile

                await serve(
                    app,
                    hypercorn_config(config),
                    shutdown_trigger=stop_when_triggered,
                    task_status=task_status,
                )
                # Scheduled runs had the requests' graceful time to end; the rest are
                # cancelled (recorded as such).
                nursery.cancel_scope.cancel()
