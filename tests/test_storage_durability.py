"""What a val stored is still there after a restart of the service, and after a `kill -9` of
the front end once the write had returned (a write that returned is committed)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import httpx
import trio

from runtime.config import Config, ServerConfig, StoreConfig
from runtime.server import serve_valrun
from runtime.store import Store

KEEP = """\
from std import blob, sqlite

def keep(n):
    sqlite.batch([
        "CREATE TABLE IF NOT EXISTS kept (n INTEGER PRIMARY KEY)",
        ("INSERT INTO kept VALUES (?)", (n,)),
    ])
    blob.set("k" + str(n), str(n))
    return n
"""
READ = """\
from std import blob, sqlite

def read():
    rows = sqlite.execute("SELECT n FROM kept ORDER BY n").rows
    return [[r[0] for r in rows], [e["key"] for e in blob.list()]]
"""


class Client:
    def __init__(self, port: int, token: str) -> None:
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30)
        self.headers = {"host": f"api.localhost:{port}", "authorization": f"Bearer {token}"}

    async def put_val(self, name: str, code: str) -> None:
        response = await self.http.put(
            f"/v1/vals/alice/{name}", json={"code": code}, headers=self.headers
        )
        assert response.status_code in (200, 201), response.text

    async def run(self, name: str, *args: object) -> object:
        response = await self.http.post(
            f"/v1/run/alice.{name}", json=list(args), headers=self.headers
        )
        assert response.status_code == 200, response.text
        return response.json()


@asynccontextmanager
async def in_process(config: Config, token: str) -> AsyncIterator[Client]:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(20):
            urls = await nursery.start(partial(serve_valrun, config, shutdown_trigger=stop.wait))
        client = Client(int(urls[0].rpartition(":")[2]), token)
        try:
            yield client
        finally:
            await client.http.aclose()
            stop.set()


def make_config(tmp_path: Path) -> tuple[Config, str]:
    db_path = tmp_path / "valrun.db"
    store = Store(db_path)
    token = store.create_user("alice")
    store.close()
    config = Config(
        server=ServerConfig(bind=("127.0.0.1:0",)), store=StoreConfig(url=f"sqlite:///{db_path}")
    )
    return config, token


async def test_data_survives_a_restart(tmp_path: Path) -> None:
    config, token = make_config(tmp_path)
    async with in_process(config, token) as client:
        await client.put_val("keep", KEEP)
        await client.put_val("read", READ)
        for n in (1, 2, 3):
            assert await client.run("keep", n) == n
    async with in_process(config, token) as client:
        assert await client.run("read") == [[1, 2, 3], ["k1", "k2", "k3"]]


async def test_data_survives_kill_9_of_the_front_end(tmp_path: Path) -> None:
    config, token = make_config(tmp_path)
    toml = tmp_path / "valrun.toml"
    # One process: the kill is of *the* front end (a supervisor's children stop on their own
    # when it dies, finishing what they hold: tests/test_processes.py).
    toml.write_text(f'[store]\nurl = "{config.store.url}"\n[server]\nprocesses = 1\n')
    command = [sys.executable, "-m", "runtime.cli", "--config", str(toml), "serve"]
    command += ["--bind", "127.0.0.1:0"]
    # Its own session: the kill takes the front end and the workers it started, at once.
    process = await trio.lowlevel.open_process(
        command, stderr=subprocess.PIPE, start_new_session=True
    )
    assert process.stderr is not None
    try:
        with trio.fail_after(30):
            seen = b""
            while not (found := re.search(rb"serving on http://127\.0\.0\.1:(\d+)", seen)):
                chunk = await process.stderr.receive_some()
                assert chunk, seen.decode(errors="replace")
                seen += chunk
        async with trio.open_nursery() as nursery:

            async def drain() -> None:  # the access log must not fill the pipe
                assert process.stderr is not None
                while await process.stderr.receive_some():
                    pass

            nursery.start_soon(drain)
            client = Client(int(found[1]), token)
            with trio.fail_after(30):
                await client.put_val("keep", KEEP)
                await client.put_val("read", READ)
                for n in (1, 2, 3, 4):
                    assert await client.run("keep", n) == n
            # The last write returned: kill at once, with no chance to flush anything.
            os.killpg(process.pid, signal.SIGKILL)
            with trio.fail_after(10):
                assert await process.wait() == -signal.SIGKILL
            await client.http.aclose()
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    async with in_process(config, token) as client:
        assert await client.run("read") == [[1, 2, 3, 4], ["k1", "k2", "k3", "k4"]]
