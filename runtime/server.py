"""Start the whole service: store, worker pool, invocation recorder, and hypercorn's trio
server around the app."""

from __future__ import annotations

import logging
import signal
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
from runtime.startup import open_store
from runtime.store import AsyncStore

logger = logging.getLogger(__name__)


def hypercorn_config(config: Config) -> HypercornConfig:
    hconfig = HypercornConfig()
    hconfig.bind = list(config.server.bind)
    hconfig.graceful_timeout = config.server.shutdown_timeout_s
    hconfig.accesslog = None  # valrun writes its own access line (runtime.app)
    hconfig.errorlog = logging.getLogger("hypercorn.error")  # through our logging setup
    hconfig.include_server_header = False
    hconfig.backlog = config.server.backlog
    # The front end enforces the header limits with a clear 431 (runtime.headers); h11's
    # limit applies only to a header block still incomplete, so it is a backstop.
    hconfig.h11_max_incomplete_size = config.limits.max_request_header_bytes
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
    with (
        closing(open_store(config.store.sqlite_path)) as store,
        closing(open_store(config.store.sqlite_path)) as records_store,
    ):
        async_store = AsyncStore(store)
        async with (
            open_pool(config) as pool,
            # Inside the pool: at shutdown the server finishes its requests, then the
            # recorder writes what they recorded, then the workers stop.
            open_recorder(
                AsyncStore(records_store),
                keep_per_val=config.store.max_runs_per_val,
                max_bytes=config.store.max_runs_bytes,
            ) as recorder,
        ):
            app = App(config, async_store, pool, recorder, Metrics())
            await serve(
                app,
                hypercorn_config(config),
                shutdown_trigger=shutdown_trigger,
                task_status=task_status,
            )


async def serve_until_signalled(
    config: Config, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run valrun until SIGINT or SIGTERM, then stop in order.

    The first signal stops accepting and lets in-flight requests finish for up to
    `shutdown_timeout_s`. A second one cuts that grace short: in-flight requests are cancelled
    (and recorded as such), but the rest of the shutdown is the same: records written,
    workers and fork server stopped, the workers' directory removed. The receiver stays open
    until the end, so no later signal falls back to the default action (instant death).
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        stopping = trio.Event()
        serving = trio.CancelScope()

        async def watch() -> None:
            async for signum in signals:
                name = signal.Signals(signum).name
                if not stopping.is_set():
                    logger.info("received %s: finishing in-flight requests, then stopping", name)
                    stopping.set()
                elif not serving.cancel_called:
                    logger.warning(
                        "received %s again: cancelling in-flight requests; records are still "
                        "written and workers stopped",
                        name,
                    )
                    serving.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            with serving:
                await serve_valrun(config, shutdown_trigger=stopping.wait, task_status=task_status)
            nursery.cancel_scope.cancel()
