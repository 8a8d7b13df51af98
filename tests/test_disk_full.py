"""A full disk under a running valrun: saves and env changes are 507 `storage_full` with a
reason, reads and invocations go on, invocation records wait and are written once there is
room again, /healthz says degraded, and nothing acknowledged is lost."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import trio

from runtime.config import Config, LimitsConfig, ServerConfig, StoreConfig
from runtime.server import serve_valrun
from runtime.store import Store
from tests.helpers import Service
from tests.live import fill, tmpfs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")

HELLO = "def hello(req):\n    print('called')\n    return 'hi'\n"


async def start(nursery: trio.Nursery, db_path: Path) -> Service:
    config = Config(
        server=ServerConfig(bind=("127.0.0.1:0",)),
        store=StoreConfig(url=f"sqlite:///{db_path}"),
        limits=LimitsConfig(wall_time_s=5.0),
    )
    store = Store(db_path)
    tokens = {"alice": store.create_user("alice")}
    store.close()
    with trio.fail_after(20):
        urls = await nursery.start(
            lambda task_status: serve_valrun(config, task_status=task_status)
        )
    port = int(urls[0].rpartition(":")[2])
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30)
    return Service(config, port, client, tokens, db_path)


async def test_full_disk_refuses_writes_clearly_and_loses_nothing(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with tmpfs(tmp_path, "2m") as disk, trio.fail_after(60):
        service = await start(nursery, disk / "valrun.db")
        await service.put_val("hello", HELLO)
        assert (await service.api("GET", "/healthz", user=None)).status_code == 200
        filler = fill(disk)

        big = "x = 1\n" + "# " + "y" * 200_000 + "\n" + HELLO
        saved = await service.api("PUT", "/v1/vals/alice/hello", content=big)
        assert saved.status_code == 507, saved.text
        assert saved.json()["error"]["type"] == "storage_full"
        assert "disk" in saved.json()["error"]["message"]
        env = await service.api("PUT", "/v1/env/KEY", content="v" * 60_000)
        assert env.status_code == 507, env.text

        # Reads and invocations go on; their records wait in memory.
        assert (await service.api("GET", "/v1/vals/alice/hello")).json()["version"] == 1
        for _ in range(5):
            assert (await service.web("alice", "hello")).text == "hi"
        health = await service.api("GET", "/healthz", user=None)
        assert health.status_code == 503
        assert health.json()["status"] == "degraded"
        assert any("store cannot be written" in p for p in health.json()["problems"])

        filler.unlink()
        while (await service.api("GET", "/healthz", user=None)).status_code != 200:
            await trio.sleep(0.2)
        runs = (await service.api("GET", "/v1/vals/alice/hello/runs")).json()["runs"]
        assert len(runs) == 5
        assert all(run["log"] == "called\n" for run in runs)
        assert (await service.api("GET", "/v1/vals/alice/hello")).json()["version"] == 1
        saved = await service.api("PUT", "/v1/vals/alice/hello", content=big)
        assert saved.status_code == 200, saved.text
        await service.client.aclose()
        nursery.cancel_scope.cancel()
