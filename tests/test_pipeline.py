"""Pipelining (runtime/pipeline.py): requests sent to a busy worker behind its current one.

With the window full, whatever the head request does (answers, times out, crashes, lies, or
its client leaves), the head gets what it would get alone, and every request behind it gets
its own reply: answered on the same worker, or sent again to another one; never twice, never
another request's reply. Real worker processes: the hostile fake (tests/fakes) for the
failures a val cannot cause, real sandboxed workers for the rest.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio.testing

from runtime.config import Config, LimitsConfig, PoolConfig
from runtime.errors import HTTPError
from runtime.pool import Pool, ValSpec, open_pool
from runtime.process import WorkerProcess
from runtime.reply import ValResponse
from sandbox.messages import MAX_PIPELINE_WINDOW, BlobAnswer, BlobAsk, HttpRequest
from sandbox.tether import UNTETHERED
from sandbox.wire import Frame, FrameDecoder, ProtocolError, encode_frame
from sandbox.worker import Channel
from tests.helpers import HOSTILE_SPEC as SPEC
from tests.helpers import HOSTILE_WORKER as FAKE

WINDOW = 4
CONFIG = Config(
    limits=LimitsConfig(wall_time_s=1.5),
    # One worker per val, so requests behind a busy one are pipelined into it; a generous
    # "fast" bound, so a head that sleeps half a second still takes them.
    pool=PoolConfig(
        prewarm_workers=1, max_workers_per_val=1, pipeline_window=WINDOW, pipeline_below_s=5.0
    ),
)
Outcome = bytes | HTTPError


def request(path: str, query: str = "") -> HttpRequest:
    return HttpRequest(0, "GET", path, path, query, ())


async def outcome(pool: Pool, spec: ValSpec, sent: HttpRequest) -> Outcome:
    try:
        reply = await pool.invoke(spec, sent)
    except HTTPError as exc:
        return exc
    if not isinstance(reply.outcome, ValResponse):
        assert isinstance(reply.outcome, HTTPError), reply.outcome
        return reply.outcome
    return reply.outcome.body


async def wait_for(condition: object) -> None:
    assert callable(condition)
    while not condition():
        await trio.sleep(0.01)


async def window_full(
    pool: Pool, spec: ValSpec, head: HttpRequest, behind: list[HttpRequest]
) -> tuple[Outcome, list[Outcome]]:
    """Run `head`, and while it runs send `behind` (pipelined into its worker)."""
    results: dict[int, Outcome] = {}

    async def run(index: int, sent: HttpRequest) -> None:
        results[index] = await outcome(pool, spec, sent)

    pipelined = pool.stats["pipelined"]
    async with trio.open_nursery() as nursery:
        invocations = pool.stats["invocations"]
        nursery.start_soon(run, 0, head)
        await wait_for(lambda: pool.stats["invocations"] > invocations)
        for index, sent in enumerate(behind, 1):
            nursery.start_soon(run, index, sent)
        await wait_for(lambda: pool.stats["pipelined"] >= pipelined + len(behind))
    return results[0], [results[i] for i in range(1, len(behind) + 1)]


BEHIND = [request("/echo", f"n={n}") for n in range(WINDOW - 1)]
ECHOES = [f"n={n}".encode() for n in range(WINDOW - 1)]


async def test_requests_behind_a_busy_worker_get_their_own_replies_on_it() -> None:
    with trio.fail_after(30):
        async with open_pool(CONFIG, worker_command=FAKE) as pool:
            assert await outcome(pool, SPEC, request("/echo", "first")) == b"first"
            head, behind = await window_full(pool, SPEC, request("/echo", "slow"), BEHIND)
            assert head == b"slow"
            assert behind == ECHOES
            assert pool.stats["pipelined"] == WINDOW - 1
            assert pool.stats["pipelined_sent_again"] == 0
            assert pool.stats["cold_starts"] == 1  # all of it on one worker


@pytest.mark.parametrize(
    ("path", "status", "error_type"),
    [
        ("/wrong-id", 502, "protocol_error"),  # lies: another request's id
        ("/garbage", 502, "protocol_error"),
        ("/bad-status", 502, "bad_response"),
        ("/half-then-hang", 504, "timeout"),
        ("/exit-mid-reply", 502, "worker_crashed"),
        ("/silent-exit", 502, "worker_crashed"),
        ("/ask-for-another-request", 502, "protocol_error"),
    ],
)
async def test_a_failing_head_costs_only_itself_and_the_rest_are_sent_again(
    path: str, status: int, error_type: str
) -> None:
    with trio.fail_after(40):
        async with open_pool(CONFIG, worker_command=FAKE) as pool:
            assert await outcome(pool, SPEC, request("/echo", "first")) == b"first"
            head, behind = await window_full(pool, SPEC, request(path, "slow"), BEHIND)
            assert isinstance(head, HTTPError)
            assert (head.status, head.type) == (status, error_type)
            # Each got its own reply, once, from a worker of its own.
            assert behind == ECHOES
            assert pool.stats["pipelined_sent_again"] == WINDOW - 1
            assert pool.stats[f"killed_{error_type}"] == 1
            assert await outcome(pool, SPEC, request("/echo", "after")) == b"after"


async def test_a_request_whose_client_left_while_waiting_costs_the_worker_not_the_others() -> None:
    with trio.fail_after(30):
        async with open_pool(CONFIG, worker_command=FAKE) as pool:
            assert await outcome(pool, SPEC, request("/echo", "first")) == b"first"
            results: dict[str, Outcome] = {}
            leaving = trio.CancelScope()

            async def run(name: str, sent: HttpRequest) -> None:
                results[name] = await outcome(pool, SPEC, sent)

            async def client_who_leaves() -> None:
                with leaving:
                    await outcome(pool, SPEC, request("/echo", "left"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, "head", request("/echo", "slow"))
                await wait_for(lambda: pool.stats["invocations"] >= 2)
                nursery.start_soon(client_who_leaves)
                await wait_for(lambda: pool.stats["pipelined"] >= 1)
                nursery.start_soon(run, "after", request("/echo", "after"))
                await wait_for(lambda: pool.stats["pipelined"] >= 2)
                leaving.cancel()  # while it waits its turn behind the head
            assert leaving.cancelled_caught
            assert results == {"head": b"slow", "after": b"after"}
            assert pool.stats["killed_cancelled"] == 1
            assert pool.stats["pipelined_sent_again"] == 1


# Real sandboxed workers

SLEEPER = (
    "import time\n"
    "def s(req):\n"
    "    if req.query.get('slow'):\n"
    "        time.sleep(float(req.query.get('slow')))\n"
    "    if req.query.get('hog'):\n"
    "        hog = 'x' * (1024 * 1024 * 1024)\n"
    "    return req.query.get('n', '')\n"
)
REAL = ValSpec(7, 1, "alice", "s", SLEEPER, (), "alice-s.web.localhost")


async def test_real_worker_serves_requests_sent_while_its_val_runs() -> None:
    # The tether ends a worker whose front end hung up while a val runs; requests arriving
    # then make the socket readable too, and must not end it.
    with trio.fail_after(40):
        async with open_pool(CONFIG) as pool:
            assert await outcome(pool, REAL, request("/", "n=first")) == b"first"
            head, behind = await window_full(
                pool,
                REAL,
                request("/", "slow=0.5&n=head"),
                [request("/", f"n={n}") for n in range(3)],
            )
            assert head == b"head"
            assert behind == [b"0", b"1", b"2"]
            assert pool.stats["pipelined_sent_again"] == 0
            assert pool.stats["cold_starts"] == 1


async def test_real_worker_out_of_memory_costs_only_its_request() -> None:
    with trio.fail_after(40):
        async with open_pool(CONFIG) as pool:
            assert await outcome(pool, REAL, request("/", "n=first")) == b"first"
            head, behind = await window_full(
                pool,
                REAL,
                request("/", "slow=0.3&hog=1"),
                [request("/", f"n={n}") for n in range(3)],
            )
            assert isinstance(head, HTTPError)
            assert head.type == "memory_limit"
            assert behind == [b"0", b"1", b"2"]
            assert pool.stats["pipelined_sent_again"] == 3


async def test_a_slow_val_is_not_pipelined() -> None:
    config = replace(CONFIG, pool=replace(CONFIG.pool, pipeline_below_s=0.05))
    with trio.fail_after(40):
        async with open_pool(config) as pool:
            assert await outcome(pool, REAL, request("/", "slow=0.2&n=first")) == b"first"
            results: list[Outcome] = []

            async def run(n: int) -> None:
                results.append(await outcome(pool, REAL, request("/", f"slow=0.2&n={n}")))

            async with trio.open_nursery() as nursery:
                for n in range(3):
                    nursery.start_soon(run, n)
            assert sorted(results) == [b"0", b"1", b"2"]  # type: ignore[type-var]
            assert pool.stats["pipelined"] == 0


def test_worker_keeps_requests_sent_ahead_while_an_ask_waits() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        inp = os.fdopen(os.dup(theirs.fileno()), "rb", buffering=0)
        out = os.fdopen(os.dup(theirs.fileno()), "wb")
        channel = Channel(inp, out, UNTETHERED)
        channel.invocation = 1
        ahead = [request("/", f"n={n}") for n in range(2)]
        for n, sent in enumerate(ahead, 2):
            ours.sendall(encode_frame(replace(sent, id=n).to_frame()))
        ours.sendall(encode_frame(Frame({"op": "blob_answer", "id": 1, "found": False})))
        answer = channel.ask(BlobAsk(0, "get", "k"), BlobAnswer)
        assert answer.found is False
        sent_ask = ours.recv(65536)
        assert b'"blob"' in sent_ask
        channel.invocation = None
        for n in (2, 3):
            frame = channel.receive()
            assert frame is not None
            assert frame.head["id"] == n
            assert frame.op == "http"
        inp.close()
        out.close()


def test_worker_refuses_more_requests_ahead_than_the_window() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        inp = os.fdopen(os.dup(theirs.fileno()), "rb", buffering=0)
        out = os.fdopen(os.dup(theirs.fileno()), "wb")
        channel = Channel(inp, out, UNTETHERED)
        channel.invocation = 1
        for n in range(MAX_PIPELINE_WINDOW + 1):
            ours.sendall(encode_frame(replace(request("/"), id=n + 2).to_frame()))
        with pytest.raises(ProtocolError, match="window"):
            channel.ask(BlobAsk(0, "get", "k"), BlobAnswer)
        inp.close()
        out.close()


async def test_fast_requests_are_not_queued_behind_a_slow_one_when_another_worker_is_free() -> None:
    config = replace(
        CONFIG, pool=replace(CONFIG.pool, max_workers_per_val=2, pipeline_below_s=0.05)
    )
    with trio.fail_after(40):
        async with open_pool(config) as pool:
            async with trio.open_nursery() as nursery:  # two warm workers, both fast so far
                for n in range(2):
                    nursery.start_soon(outcome, pool, REAL, request("/", f"n={n}"))
            assert pool.stats["cold_starts"] == 2
            done: list[str] = []

            async def run(name: str, query: str) -> None:
                assert await outcome(pool, REAL, request("/", query)) == name.encode()
                done.append(name)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, "slow", "slow=1.2&n=slow")
                await trio.sleep(0.3)  # it has run longer than `pipeline_below_s` now
                for n in range(3):
                    nursery.start_soon(run, f"fast{n}", f"n=fast{n}")
            # All three answered on the other worker while the slow one still ran.
            assert done[-1] == "slow"
            assert sorted(done[:3]) == ["fast0", "fast1", "fast2"]
            assert pool.stats["cold_starts"] == 2


TETHERED_LOOP = """
import select, signal, socket, sys, time
from sandbox.tether import Tether
theirs = socket.socket(fileno=int(sys.argv[1]))
tether = Tether(theirs.fileno())
print("ready", flush=True)
deadline = time.monotonic() + 1.5
while time.monotonic() < deadline:  # a val running while requests arrive, re-entering often
    with tether:
        pass
print("survived", flush=True)
with tether:
    time.sleep(30)  # ended by the hang-up, not by the end of this sleep
"""


async def test_requests_arriving_while_a_val_runs_do_not_end_its_worker_but_a_hang_up_does() -> (
    None
):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        with trio.fail_after(20):
            process = await trio.lowlevel.open_process(
                [sys.executable, "-I", "-c", TETHERED_LOOP, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdout=subprocess.PIPE,
                cwd=Path(__file__).parent.parent,
            )
            assert process.stdout is not None
            lines = process.stdout
            assert (await lines.receive_some(100)).startswith(b"ready")
            stop = trio.current_time() + 1.2
            ours.setblocking(False)
            sent = 0
            while trio.current_time() < stop:  # each send raises SIGIO in the child
                with contextlib.suppress(BlockingIOError):
                    sent += ours.send(b"x")
                await trio.sleep(0.0002)
            assert sent > 100
            output = await lines.receive_some(100)
            assert b"survived" in output
            started = trio.current_time()
            ours.shutdown(socket.SHUT_WR)
            assert await process.wait() == 0
            assert trio.current_time() - started < 10


# --- WorkerProcess.send_nowait: a warm request's frame sent without a wait -------------------


async def test_send_nowait_sends_whole_frames_or_leaves_the_rest_to_send_in_order() -> None:
    """A frame the socket takes at once goes whole; one it takes only part of is finished by
    the same task's `send`, and another task's frame waits behind it: the worker reads
    every frame whole and in order. While a send is in progress, nothing goes."""
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    worker = WorkerProcess(0, trio.SocketStream(trio.socket.from_stdlib_socket(ours)), 1 << 24)
    worker.raw_socket = ours
    decoder = FrameDecoder(max_body_bytes=1 << 24)
    small = Frame({"op": "http", "id": 1}, b"x" * 100)
    big = Frame({"op": "http", "id": 2}, b"y" * (1 << 20))  # far over the socket's buffer
    behind = Frame({"op": "http", "id": 3}, b"z" * 10)

    assert worker.send_nowait(small)
    assert worker.send_nowait(big) is False  # part of it went; this task holds the lock
    assert worker.send_nowait(behind) is False  # a send is in progress: nothing goes
    theirs.setblocking(False)
    frames: list[Frame] = []

    async def read() -> None:
        while len(frames) < 3:
            await trio.lowlevel.wait_readable(theirs)
            decoder.feed(theirs.recv(1 << 16))
            while (frame := decoder.next_frame()) is not None:
                frames.append(frame)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            nursery.start_soon(worker.send, behind)  # another task's: waits for the lock
            await trio.testing.wait_all_tasks_blocked()
            await worker.send(big)  # the rest of it, in the task that began it
    assert frames == [small, big, behind]
    theirs.close()
    ours.close()


def test_send_nowait_declines_without_a_socket_or_when_the_buffer_is_full() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    frame = Frame({"op": "http", "id": 1}, b"x" * 100)
    worker = WorkerProcess(0, trio.SocketStream(trio.socket.from_stdlib_socket(ours)), 1 << 20)
    assert worker.send_nowait(frame) is False  # no raw socket (a spawned worker's pipes)
    worker.raw_socket = ours
    with contextlib.suppress(BlockingIOError):
        while True:
            ours.send(b"\0" * 65536)
    assert worker.send_nowait(frame) is False  # full: nothing sent, no lock held
    assert not worker._sending.locked()
    theirs.close()
    ours.close()
