"""Fixtures: a real valrun on 127.0.0.1:0 with real worker subprocesses and a real SQLite file.

The handle they return, `Service`, and the other shared helpers are in tests/helpers.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from runtime.config import (
    Config,
    FetchConfig,
    PoolConfig,
    ServerConfig,
    StorageConfig,
    StoreConfig,
)
from runtime.server import serve_valrun
from runtime.store import Store
from tests import pg_kit
from tests.helpers import TEST_LIMITS, Service, StartService


@pytest.fixture
async def start_service(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[StartService]:
    """Start a valrun; keyword arguments replace fields of [limits], [pool] and [storage]."""
    clients: list[httpx.AsyncClient] = []

    async def start(**overrides: Any) -> Service:
        db_path = tmp_path / f"valrun-{len(clients)}.db"
        limits = replace(
            TEST_LIMITS, **{k: v for k, v in overrides.items() if hasattr(TEST_LIMITS, k)}
        )
        pool = replace(
            PoolConfig(), **{k: v for k, v in overrides.items() if hasattr(PoolConfig(), k)}
        )
        storage = replace(
            StorageConfig(),
            **{k: v for k, v in overrides.items() if hasattr(StorageConfig(), k)},
        )
        config = Config(
            server=ServerConfig(bind=("127.0.0.1:0",)),
            store=StoreConfig(url=f"sqlite:///{db_path}"),
            limits=limits,
            pool=pool,
            fetch=overrides.get("fetch", FetchConfig()),
            storage=storage,
        )
        store = Store(db_path)
        tokens = {name: store.create_user(name) for name in ("alice", "bob")}
        store.close()
        with trio.fail_after(20):
            urls: list[str] = await nursery.start(
                lambda task_status: serve_valrun(config, task_status=task_status)
            )
        port = int(urls[0].rpartition(":")[2])
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30)
        clients.append(client)
        return Service(config, port, client, tokens, db_path)

    yield start
    for client in clients:
        await client.aclose()


@pytest.fixture
async def service(start_service: StartService) -> Service:
    return await start_service()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[pg_kit.Cluster]:
    """One throwaway PostgreSQL server for the session (tests/pg_kit.py), stopped at its end."""
    cluster = pg_kit.start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: pg_kit.Cluster) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test: its postgresql:// URL."""
    url = pg_cluster.create_database()
    yield url
    pg_cluster.drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a store lives, once per backend: an SQLite file, then a PostgreSQL database."""
    if request.param == "postgresql":
        return str(request.getfixturevalue("pg_url"))
    return str(tmp_path / "store.db")
