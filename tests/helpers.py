"""What several test modules share: the running service's handle, the CLI as a process, the
worker as a subprocess, sample vals and the JSON error check. Fixtures are in conftest.py.

Python clients do not resolve *.localhost, so `Service` connects to 127.0.0.1 and names the
host in the Host header (Chromium resolves *.localhost itself; see test_browser.py).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import coverage
import httpx
import trio

from runtime.config import (
    Config,
    LimitsConfig,
    PoolConfig,
    ServerConfig,
    StorageConfig,
    StoreConfig,
)
from runtime.pool import Pool, ValSpec
from runtime.reply import ValResponse
from runtime.server import serve_valrun
from runtime.store import Store
from sandbox.messages import HttpRequest
from sandbox.wire import Frame, FrameDecoder, encode_frame

# Short enough that timeout tests are quick, long enough for a cold worker on a busy machine.
TEST_LIMITS = LimitsConfig(wall_time_s=3.0)

HELLO = """
def hello(req):
    return Response.json({"greeting": "hi " + req.query.get("name", "world")})
"""

COUNTER = """
count = 0
def counter(req):
    global count
    count += 1
    return {"count": count, "version": VERSION}
"""


def counter_code(version: int) -> str:
    return f"VERSION = {version}\n{COUNTER}"


def assert_json_error(response: httpx.Response, status: int, error_type: str) -> dict[str, str]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error: dict[str, str] = response.json()["error"]
    assert error["type"] == error_type
    assert error["message"]
    return error


# --- the service, through the real server ---------------------------------------------------


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


@asynccontextmanager
async def configured_service(
    tmp_path: Path, *, server: dict[str, Any] | None = None, store: dict[str, Any] | None = None
) -> AsyncIterator[Service]:
    """A valrun with any [server] and [store] settings (`start_service` sets only [limits]
    and [pool]); it stops, as on shutdown, when the block ends."""
    db_path = tmp_path / "configured.db"
    config = Config(
        server=ServerConfig(bind=("127.0.0.1:0",), **(server or {})),
        store=StoreConfig(url=f"sqlite:///{db_path}", **(store or {})),
        limits=TEST_LIMITS,
    )
    db = Store(db_path)
    tokens = {name: db.create_user(name) for name in ("alice", "bob")}
    db.close()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(20):
            urls: list[str] = await nursery.start(
                lambda task_status: serve_valrun(config, task_status=task_status)
            )
        port = int(urls[0].rpartition(":")[2])
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield Service(config, port, client, tokens, db_path)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def service_on(
    location: str, data_dir: Path, tokens: dict[str, str]
) -> AsyncIterator[Service]:
    """A valrun on an existing store (an SQLite path or a postgresql:// URL), e.g. one of
    several nodes sharing it; it stops when the block ends."""
    url = location if location.startswith("postgresql://") else f"sqlite:///{location}"
    config = Config(
        server=ServerConfig(bind=("127.0.0.1:0",)),
        store=StoreConfig(url=url),
        limits=TEST_LIMITS,
        storage=StorageConfig(data_dir=str(data_dir)),
    )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(20):
            urls: list[str] = await nursery.start(
                lambda task_status: serve_valrun(config, task_status=task_status)
            )
        port = int(urls[0].rpartition(":")[2])
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield Service(config, port, client, tokens, Path(location))
        nursery.cancel_scope.cancel()


# --- the CLI, as a user runs it: a real process against the real server -------------------


def python() -> list[str]:
    """The command that runs Python for the CLI: under coverage when this test run is.

    The CLI runs unconfined, so its process can write its own coverage data (scripts/test
    combines it); worker processes cannot (see pyproject.toml's [tool.coverage.run]).
    """
    if coverage.Coverage.current() is None:
        return [sys.executable]
    return [sys.executable, "-m", "coverage", "run", "--parallel-mode"]


async def valrun(
    service: Service, *args: str, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    config = service.db_path.with_suffix(".toml")
    config.write_text(
        f'[server]\nbind = ["127.0.0.1:{service.port}"]\n'
        f'[store]\nurl = "sqlite:///{service.db_path}"\n'
    )
    with trio.fail_after(30):
        return await trio.run_process(
            [*python(), "-m", "runtime.cli", "--config", str(config), *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


# --- the worker as a subprocess speaking the wire protocol on stdin/stdout ------------------

WORKER = [sys.executable, "-I", "-m", "sandbox.worker"]
TIMEOUT_S = 10  # a guard against a hung worker, not an expected duration


@dataclass(frozen=True)
class Run:
    frames: list[Frame]
    returncode: int
    stderr: str


def load_frame(
    source: str, name: str = "f", env: dict[str, str] | None = None, **limits: int
) -> Frame:
    head: dict[str, object] = {"op": "load", "name": name, "env": env or {}}
    if limits:
        head["limits"] = limits
    return Frame(head, textwrap.dedent(source).encode())


def run_worker(*frames: Frame) -> Run:
    proc = subprocess.run(
        WORKER,
        input=b"".join(encode_frame(frame) for frame in frames),
        capture_output=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    decoder = FrameDecoder()
    decoder.feed(proc.stdout)
    replies = []
    while (frame := decoder.next_frame()) is not None:
        replies.append(frame)
    assert decoder.pending_bytes == 0, "the worker wrote something that is not a whole frame"
    return Run(replies, proc.returncode, proc.stderr.decode(errors="replace"))


# The CLI as its users run it, and what the access log says


async def cli(
    *args: str,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    stdin: bytes = b"",
) -> subprocess.CompletedProcess[bytes]:
    """`valrun ARGS` in `cwd`, with an environment that has no VALRUN_* of the caller's."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VALRUN_")}
    environ["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    with trio.fail_after(30):
        return await trio.run_process(
            [*python(), "-m", "runtime.cli", *args],
            cwd=cwd,
            env={**environ, **(env or {})},
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


def write_config(folder: Path, service: Service, db: str | None = None) -> Path:
    """A valrun.toml naming the service's port and (relative to `folder`) its database."""
    folder.mkdir(parents=True, exist_ok=True)
    db_url = db if db is not None else str(service.db_path)
    path = folder / "valrun.toml"
    path.write_text(
        f'[server]\nbind = ["127.0.0.1:{service.port}"]\n[store]\nurl = "sqlite:///{db_url}"\n'
    )
    return path


class AccessLines(logging.Handler):
    """The access lines an in-process valrun writes, awaitable: the line is written after
    the response is sent, so a client can have its answer before the line exists."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self._written = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        self._written.set()  # the server runs in this trio run, on this thread

    async def wait_for(self, prefix: str) -> str:
        with trio.fail_after(10):
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line
                self._written = trio.Event()
                await self._written.wait()


@contextmanager
def capture_access_lines() -> Iterator[AccessLines]:
    handler = AccessLines()
    logger = logging.getLogger("valrun.access")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# The pool driven by a fake, hostile worker (tests/fakes/hostile_worker.py)

# Run by path: workers start in an empty directory, where `tests` is not importable.
HOSTILE_WORKER = (sys.executable, str(Path(__file__).parent / "fakes" / "hostile_worker.py"))
HOSTILE_SPEC = ValSpec(1, 1, "alice", "fake", "unused", (), "alice-fake.web.localhost")
HOSTILE_CONFIG = Config(
    limits=LimitsConfig(wall_time_s=1.5),
    pool=PoolConfig(prewarm_workers=1, max_workers_per_val=1),
)


def hostile_request(path: str) -> HttpRequest:
    return HttpRequest(0, "GET", path, path, "", ())


async def hostile_ok(pool: Pool) -> bytes:
    reply = await pool.invoke(HOSTILE_SPEC, hostile_request("/ok"))
    assert isinstance(reply.outcome, ValResponse)
    return reply.outcome.body


# The pool driven directly (no HTTP), with a counter val

POOL_COUNTER = "n = 0\ndef c(req):\n    global n\n    n += 1\n    return str(n)\n"


def counter_spec(
    val_id: int = 1,
    version: int = 1,
    code: str = POOL_COUNTER,
    env: tuple[tuple[str, str], ...] = (),
) -> ValSpec:
    return ValSpec(val_id, version, "alice", "c", code, env, "alice-c.web.localhost")


COUNTER_REQUEST = HttpRequest(0, "GET", "/", "/", "", ())


async def counter_body(pool: Pool, val: ValSpec) -> bytes:
    reply = await pool.invoke(val, COUNTER_REQUEST)
    assert isinstance(reply.outcome, ValResponse), reply.outcome
    return reply.outcome.body
