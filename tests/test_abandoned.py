"""A request its client abandons stops its work (runtime.abandon): the worker is killed and
its slot is free for the next request, over HTTP/1.1 (the connection closed) and HTTP/2 (the
stream reset, the connection kept)."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import trio
import trio.testing
from hypercorn.typing import ASGIReceiveEvent

from runtime.abandon import Abandonment
from runtime.errors import ClientGoneError, NotFoundError
from tests.helpers import Service, StartService

SLEEPY = """
import time
def sleepy(req):
    time.sleep(float(req.query.get("s", "0")))
    return "slept"
"""

SPIN = """
def spin(req):
    n = 0
    while req.query.get("forever"):
        n += 1
    return "spun"
"""


async def pool_counter(service: Service, name: str) -> int:
    text = (await service.api("GET", "/metrics", user=None)).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    return 0


async def busy_workers(service: Service) -> int:
    return await pool_counter(service, 'valrun_workers{state="busy"}')


async def wait_until_busy(service: Service) -> None:
    while await busy_workers(service) < 1:  # ASYNC110: polled, under the caller's fail_after
        await trio.sleep(0.02)


async def abandon_http1(service: Service, user: str, val: str, target: str) -> None:
    """Send a request, wait until a worker runs it, and close the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", service.port)
    host = service.web_host(user, val)
    await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await wait_until_busy(service)
    await stream.aclose()


async def test_a_closed_connection_frees_the_worker_for_the_same_users_next_request(
    start_service: StartService,
) -> None:
    # One worker for the val, and the wall time far away: only the cancellation frees it.
    service = await start_service(wall_time_s=120.0, cpu_time_s=120, max_workers_per_val=1)
    await service.put_val("sleepy", SLEEPY)
    await service.put_val("spin", SPIN)
    with trio.fail_after(60):
        for val, target in (("sleepy", "/?s=100"), ("spin", "/?forever=1")):
            assert (await service.web("alice", val)).status_code == 200  # warm
            await abandon_http1(service, "alice", val, target)
            with trio.fail_after(15):  # not the 100 s the abandoned one had left
                again = await service.web("alice", val)
            assert again.status_code == 200
            assert again.text in ("slept", "spun")
        assert await pool_counter(service, 'valrun_worker_kills_total{reason="cancelled"}') == 2
        runs = await service.api("GET", "/v1/vals/alice/sleepy/runs")
        statuses = [run["status"] for run in runs.json()["runs"]]
        assert 499 in statuses


async def test_an_abandoned_eval_gives_its_slot_back(start_service: StartService) -> None:
    service = await start_service(wall_time_s=120.0, max_evals_per_user=1)
    code = "import time\ntime.sleep(100)\n1"
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.port}") as abandoner:
            headers = {
                "host": service.api_host,
                "authorization": f"Bearer {service.tokens['alice']}",
            }
            async with trio.open_nursery() as nursery:

                async def slow_eval() -> None:
                    await abandoner.post("/v1/eval", headers=headers, json={"code": code})

                nursery.start_soon(slow_eval)
                await wait_until_busy(service)  # an Eval's worker counts as busy
                nursery.cancel_scope.cancel()  # httpx closes the connection
        with trio.fail_after(15):
            again = await service.api("POST", "/v1/eval", json={"code": "2 + 2"})
        assert again.status_code == 200, again.text
        assert again.json() == 4


async def test_a_reset_http2_stream_frees_the_worker(start_service: StartService) -> None:
    # Cleartext HTTP/2 is off by default (contract §15 13.8); this client speaks it.
    service = await start_service(wall_time_s=120.0, max_workers_per_val=1, h2c=True)
    await service.put_val("sleepy", SLEEPY)
    host = service.web_host("alice", "sleepy")
    with trio.fail_after(60):
        assert (await service.web("alice", "sleepy")).status_code == 200  # warm
        stream = await trio.open_tcp_stream("127.0.0.1", service.port)
        connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        connection.initiate_connection()
        headers = [
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", host),
            (":path", "/?s=100"),
        ]
        connection.send_headers(1, headers, end_stream=True)
        await stream.send_all(connection.data_to_send())
        await wait_until_busy(service)
        connection.reset_stream(1)
        await stream.send_all(connection.data_to_send())
        # The same connection asks again, on a new stream: the one worker must be free.
        connection.send_headers(3, [*headers[:3], (":path", "/")], end_stream=True)
        await stream.send_all(connection.data_to_send())
        body, status = b"", ""
        while not body:
            data = await stream.receive_some(65536)
            assert data, "the server closed the connection"
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == 3:
                    status = dict(event.headers)[b":status"].decode()
                if isinstance(event, h2.events.DataReceived) and event.stream_id == 3:
                    body += event.data
            await stream.send_all(connection.data_to_send())
        assert (status, body) == ("200", b"slept")
        await stream.aclose()
        assert await pool_counter(service, 'valrun_worker_kills_total{reason="cancelled"}') == 1


# --- the mechanism alone, with a stand-in for the ASGI receive channel ---------------------


async def test_the_work_is_cancelled_at_a_disconnect_and_its_errors_pass_unwrapped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Trio's virtual clock (it jumps when every task waits): a stall of this process cannot
    # make quick work look like 50 ms.
    send, receive_channel = trio.open_memory_channel[ASGIReceiveEvent](2)
    read = 0

    async def receive() -> ASGIReceiveEvent:
        nonlocal read
        read += 1
        return await receive_channel.receive()

    async def forever() -> str:
        await trio.sleep_forever()
        return "never"

    async def refuse() -> str:
        raise NotFoundError("no such val", "unknown_val")

    async def quick() -> str:
        await trio.sleep(0.001)
        return "quick"

    abandonment = Abandonment(watch_after_s=0.05)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(abandonment.serve)
            # Quick work is not watched: no task reads its client's messages.
            assert [await abandonment.unless_abandoned(receive, quick) for _ in range(5)] == [
                "quick"
            ] * 5
            await trio.sleep(0.1)
            assert read == 0
            with pytest.raises(NotFoundError):  # not an exception group
                await abandonment.unless_abandoned(receive, refuse)
            # A disconnect that came before the watch began is read when it begins.
            await send.send({"type": "http.request", "body": b"", "more_body": False})  # ignored
            await send.send({"type": "http.disconnect"})
            started = trio.current_time()
            with pytest.raises(ClientGoneError):
                await abandonment.unless_abandoned(receive, forever)
            assert trio.current_time() - started >= 0.05
            assert read == 2
            nursery.cancel_scope.cancel()


async def test_a_watch_ends_with_its_request() -> None:
    """Work that outlives the watch delay is watched; when it answers, its watching task
    ends too, and reads nothing more from the finished request's queue."""
    send, receive_channel = trio.open_memory_channel[ASGIReceiveEvent](2)
    waiting = 0

    async def receive() -> ASGIReceiveEvent:
        nonlocal waiting
        waiting += 1
        try:
            return await receive_channel.receive()
        finally:
            waiting -= 1

    release = trio.Event()

    async def slow() -> str:
        await release.wait()
        return "slow"

    abandonment = Abandonment(watch_after_s=0.05)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(abandonment.serve)
            results = []

            async def run() -> None:
                results.append(await abandonment.unless_abandoned(receive, slow))

            nursery.start_soon(run)
            nursery.start_soon(run)
            while waiting < 2:  # both watched, once they have run for 50 ms
                await trio.sleep(0.01)
            release.set()
            while len(results) < 2:
                await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()  # the watches' cancellations land
            assert results == ["slow", "slow"]
            assert waiting == 0  # both watches ended with their requests
            await send.send({"type": "http.disconnect"})  # nobody reads it now
            await trio.testing.wait_all_tasks_blocked()
            assert receive_channel.statistics().current_buffer_used == 1
            nursery.cancel_scope.cancel()
