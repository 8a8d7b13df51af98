"""Start the whole service: store, worker pool, invocation recorder, and hypercorn's trio
server around the app."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from contextlib import closing, nullcontext
from dataclasses import replace

import trio
from hypercorn.config import Config as HypercornConfig

from runtime import dblock
from runtime.accesslog import flush_access_lines
from runtime.app import App
from runtime.broker import Broker
from runtime.config import Config
from runtime.feed import ChangeListener, follow_changes
from runtime.fetch import open_fetcher
from runtime.frontdoor import raise_fd_limit, serve_app
from runtime.imports import Imports
from runtime.metrics import Metrics
from runtime.pg_storage import PgStorage
from runtime.pool import Pool, open_pool
from runtime.records import open_recorder
from runtime.scheduler import Scheduler, serve_scheduler
from runtime.startup import open_store
from runtime.storage import SqliteStorage, StorageBackend
from runtime.storage_api import StorageApi
from runtime.store import AsyncStore, Store
from sandbox.messages import BlobAsk, FetchAsk, ImportAsk, SqlAsk
from sandbox.wire import DEFAULT_MAX_BODY_BYTES

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
    # An idle connection, and a request's head, get this long (runtime.frontdoor).
    hconfig.keep_alive_timeout = config.server.keep_alive_timeout_s
    return hconfig


def open_storage(config: Config) -> StorageBackend:
    """The storage of the store's kind: PostgreSQL's (runtime.pg_storage) beside a
    PostgreSQL store, else SQLite files beside the store's file."""
    # A value or a SQL result travels to the worker in one frame, and the worker reads at
    # most the response cap (the wire's own limit is 8 MiB).
    max_message = min(config.limits.max_response_body_bytes, DEFAULT_MAX_BODY_BYTES)
    storage = replace(
        config.storage, max_value_bytes=min(config.storage.max_value_bytes, max_message)
    )
    if config.store.postgres:
        return PgStorage(storage, config.store.url, max_message)
    data_dir = config.storage.data_path(config.store.sqlite_path)
    return SqliteStorage(storage, data_dir, max_message)


def retire_on_change(pool: Pool) -> ChangeListener:
    """The pool's part of a change made elsewhere: the workers it made stale go."""

    def retire(kind: str, user: str | None, val_id: int | None) -> None:
        if kind == "val" and val_id is not None:
            pool.val_changed(val_id)
        elif kind == "env" and user is not None:
            pool.retire_user(user)
        elif kind == "all":
            pool.retire_all()

    return retire


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
    metrics = Metrics()
    raise_fd_limit(config.server)
    db, key = config.store.location, config.store.secret_key
    with (
        # Shared: restore and rotate-key refuse to run under a serving valrun. (PostgreSQL:
        # the change feed's connection holds the same as an advisory lock, runtime/pgdb.py.)
        nullcontext() if config.store.postgres else dblock.hold(db, exclusive=False, what="serve"),
        # The first connection proves the file usable and writable (startup.open_store); the
        # others open what it just migrated and wrote.
        closing(open_store(db, key)) as store,
        closing(Store(db, secret_key=key)) as records_store,
        closing(open_storage(config)) as storage,
        closing(Store(db, secret_key=key)) as schedule_store,
    ):
        async_store = AsyncStore(store)
        storage_api = StorageApi(storage, async_store, config.storage)
        async with (
            open_pool(config) as pool,
            # Inside the pool: at shutdown the server finishes its requests, then the
            # recorder writes what they recorded, then the workers stop.
            open_recorder(
                AsyncStore(records_store),
                keep_per_val=config.store.max_runs_per_val,
                max_bytes=config.store.max_runs_bytes,
            ) as recorder,
            open_fetcher(config.fetch, metrics.fetches) as fetcher,
        ):
            # Capabilities register their ask handlers here (fetch, storage).
            pool.broker = Broker(
                {
                    FetchAsk: fetcher.answer,
                    BlobAsk: storage_api.answer_blob,
                    SqlAsk: storage_api.answer_sql,
                    ImportAsk: Imports(async_store, pool).answer,
                }
            ).answer
            app = App(config, async_store, pool, recorder, metrics, storage_api)
            async with trio.open_nursery() as nursery:
                # What other processes and nodes change reaches this one's caches and pool.
                async_store.on_change(retire_on_change(pool))
                await nursery.start(follow_changes, async_store)
                await nursery.start(app.abandonment.serve)
                nursery.start_soon(flush_access_lines)
                scheduler: Scheduler | None = None
                if config.schedule.enabled:
                    scheduler = await nursery.start(
                        serve_scheduler, config, AsyncStore(schedule_store), app.invoker, metrics
                    )

                async def shut_down() -> None:
                    await (shutdown_trigger or trio.sleep_forever)()
                    await drain(app, config.server.drain_s)
                    app.api.followers.stop()  # long polls answer now, not at their timeout
                    if scheduler is not None:
                        scheduler.stop()  # no new ticks; runs in progress go on meanwhile

                await serve_app(
                    app,
                    hypercorn_config(config),
                    app.api.connections,
                    h2c=config.server.h2c,
                    shutdown_trigger=shut_down,
                    task_status=task_status,
                )
                # Scheduled runs had the requests' graceful time to end; the rest are
                # cancelled (recorded as such).
                nursery.cancel_scope.cancel()


async def drain(app: App, drain_s: float) -> None:
    """/healthz answers 503 "draining" from now on; requests are served as usual meanwhile."""
    app.api.health.draining = True
    if drain_s > 0:
        logger.info("draining: /healthz answers 503 for %.1f s, then valrun stops", drain_s)
        await trio.sleep(drain_s)


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
