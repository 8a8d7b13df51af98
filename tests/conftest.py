"""Fixtures: a real valrun on 127.0.0.1:0 with real worker subprocesses and a real SQLite file.

Python clients do not resolve *.localhost, so `Service` connects to 127.0.0.1 and names the
host in the Host header (Chromium resolves *.localhost itself; see test_browser.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from runtime.config import (
    Config,
    LimitsConfig,
    PoolConfig,
    ServerConfig,
    StorageConfig,
    StoreConfig,
)
from runtime.server import serve_valrun
from runtime.store import Store

# Short enough that timeout tests are quick, long enough for a cold worker on a busy machine.
TEST_LIMITS = LimitsConfig(wall_time_s=3.0)


@dataclass
class Service:
    config: Config
    port: int
    client: httpx.AsyncClient
    tokens: dict[str, str]
    db_path: Path

    @property
    def api_host(self) -> str:
        return f"{self.config.server.api_host}:{self.port}"

    def web_host(self, user: str, val: str) -> str:
        return f"{user}-{val.lower()}.{self.config.server.web_domain}:{self.port}"

    async def web(
        self, user: str, val: str, path: str = "/", method: str = "GET", **kwargs: Any
    ) -> httpx.Response:
        headers = {"host": self.web_host(user, val), **kwargs.pop("headers", {})}
        return await self.client.request(method, path, headers=headers, **kwargs)

    async def api(
        self, method: str, path: str, *, user: str | None = "alice", **kwargs: Any
    ) -> httpx.Response:
        headers = {"host": self.api_host, **kwargs.pop("headers", {})}
        if user is not None:
            headers.setdefault("authorization", f"Bearer {self.tokens[user]}")
        return await self.client.request(method, path, headers=headers, **kwargs)

    async def put_val(
        self, name: str, code: str, *, user: str = "alice", privacy: str | None = None
    ) -> httpx.Response:
        payload: dict[str, str] = {"code": code}
        if privacy is not None:
            payload["privacy"] = privacy
        response = await self.api("PUT", f"/v1/vals/{user}/{name}", user=user, json=payload)
        assert response.status_code in (200, 201), response.text
        return response


StartService = Callable[..., Awaitable[Service]]


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
