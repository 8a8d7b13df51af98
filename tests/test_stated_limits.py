"""Limits that do what the config says: request-header bytes and lines, the listen backlog,
and a ceiling on all invocation records together."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
from pathlib import Path

import pytest
import trio

from runtime.store import Record, Store
from tests.helpers import Service
from tests.live import start_live

HELLO = "def hello(req):\n    return 'hi'\n"


async def raw_status(service: Service, header_lines: list[bytes]) -> int:
    """Send a request with these header lines in one write; the status line's code."""
    head = b"GET / HTTP/1.1\r\nhost: " + service.web_host("alice", "hello").encode() + b"\r\n"
    request = head + b"".join(line + b"\r\n" for line in header_lines) + b"\r\n"
    stream = await trio.open_tcp_stream("127.0.0.1", service.port)
    async with stream:
        await stream.send_all(request)
        received = b""
        while b"\r\n" not in received:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            received += chunk
    return int(received.split(b" ", 2)[1])


@pytest.mark.parametrize(
    ("lines", "status"),
    [
        pytest.param([b"x-a: " + b"a" * 1000] * 60, 200, id="60-KB-within-the-64-KiB-limit"),
        pytest.param([b"x-a: " + b"a" * 2000] * 60, 431, id="120-KB"),
        pytest.param([b"x-a: " + b"a" * 4000] * 50, 431, id="200-KB"),
        pytest.param([b"x-a: 1"] * 99, 200, id="100-lines-with-host"),
        pytest.param([b"x-a: 1"] * 100, 431, id="101-lines"),
        pytest.param([b"x-a: 1"] * 4000, 431, id="4000-lines"),
    ],
)
async def test_request_header_limits_are_the_configured_ones(
    service: Service, lines: list[bytes], status: int
) -> None:
    await service.put_val("hello", HELLO)
    with trio.fail_after(20):
        assert await raw_status(service, lines) == status


async def test_header_limit_answer_says_what_was_wrong(service: Service) -> None:
    await service.put_val("hello", HELLO)
    headers = {f"x-{i}": "1" for i in range(150)}
    response = await service.web("alice", "hello", headers=headers)
    assert response.status_code == 431
    error = response.json()["error"]
    assert error["type"] == "headers_too_large"
    assert "header lines" in error["message"]


async def test_a_burst_of_connections_fits_the_listen_backlog(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # The front end is stopped: nothing is accepted, so every connection the kernel completes
    # waits in the listen queue. With hypercorn's default backlog (100) the rest got no
    # answer to their SYN and would retry after a second.
    with trio.fail_after(60):
        live = await start_live(nursery, tmp_path)
        os.kill(live.process.pid, signal.SIGSTOP)
        sockets: list[socket.socket] = []
        try:
            for _ in range(300):
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", live.port))
                sockets.append(sock)
            with trio.move_on_after(3):  # one deadline for all: loopback answers at once
                for sock in sockets:
                    await trio.lowlevel.wait_writable(sock)
            assert sum(map(connected, sockets)) == 300
        finally:
            for sock in sockets:
                sock.close()
            os.kill(live.process.pid, signal.SIGCONT)
            live.process.terminate()
            await live.process.wait()


def connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:  # ENOTCONN: its SYN is still unanswered
        return False
    return True


def record(val_id: int, log_bytes: int) -> Record:
    return Record(val_id, "alice", "web", 1, 0.0, 1.0, 200, "x" * log_bytes)


def total_bytes(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT sum(length(log)) FROM runs").fetchone()[0] or 0)


def test_all_records_together_stay_under_the_global_ceiling(tmp_path: Path) -> None:
    store = Store(tmp_path / "valrun.db")
    store.create_user("alice")
    val_ids = [store.put_val("alice", f"v{i}", HELLO, None)[0].val_id for i in range(20)]
    for _ in range(10):  # 20 vals x 10 records x 10 KiB = 2 MiB, each val under its 100
        store.add_records([record(val_id, 10 * 1024) for val_id in val_ids], 100, 512 * 1024)
        assert total_bytes(tmp_path / "valrun.db") <= 512 * 1024
    # The newest went last: the last batch is all there.
    with sqlite3.connect(tmp_path / "valrun.db") as db:
        newest = db.execute("SELECT val_id FROM runs ORDER BY id DESC LIMIT 20").fetchall()
    assert sorted(row[0] for row in newest) == sorted(val_ids)
    store.close()


def test_a_store_from_before_the_ceiling_gets_its_record_sizes(tmp_path: Path) -> None:
    path = tmp_path / "valrun.db"
    store = Store(path)
    store.create_user("alice")
    val_id = store.put_val("alice", "v", HELLO, None)[0].val_id
    store.add_records([record(val_id, 1000)], 100)
    store.close()
    with sqlite3.connect(path) as db:  # as an older valrun left it
        db.execute("DROP INDEX runs_sizes")
        db.execute("ALTER TABLE runs DROP COLUMN bytes")
        db.execute("PRAGMA user_version = 4")  # the schema before record sizes
    Store(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT bytes FROM runs").fetchall() == [(1000,)]
