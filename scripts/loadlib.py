"""What scripts/loadtest.py and scripts/bench.py share: where to connect, a keep-alive HTTP/1.1
client that names valrun's hosts, and percentiles.

The scripts are not a package (they run as `python scripts/NAME.py`, which puts scripts/ on
the import path), so they import this module by its bare name.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h11
import trio


class HttpError(Exception):
    """No HTTP answer: the connection failed or closed before a whole response arrived."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where to connect, and the port that Host headers name."""

    host: str
    port: int


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between ranks (numpy's default).

    NaN for no values, so an empty class shows as such instead of as zero.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0-100")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes


class HttpConnection:
    """One keep-alive HTTP/1.1 client connection (h11 over a trio stream).

    Reconnects when the server has closed an idle connection; a request that had been sent on
    a fresh connection and got no answer is not retried.
    """

    def __init__(self, target: Target) -> None:
        self.target = target
        self._stream: trio.SocketStream | None = None
        self._h11 = h11.Connection(h11.CLIENT)

    async def request(
        self,
        method: str,
        path: str,
        host: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> Answer:
        fields = [("host", host), ("content-length", str(len(body))), *headers]
        while True:
            fresh = self._stream is None
            if self._stream is None:
                try:
                    self._stream = await trio.open_tcp_stream(self.target.host, self.target.port)
                except OSError as exc:
                    raise HttpError(f"cannot connect to {self.target}: {exc}") from None
                self._h11 = h11.Connection(h11.CLIENT)
            try:
                return await self._exchange(self._stream, method, path, fields, body)
            except HttpError:
                await self.aclose()
                if fresh:
                    raise
            except BaseException:
                # Cancelled or timed out halfway: the connection's state is unknown.
                await self.aclose()
                raise

    async def _exchange(
        self,
        stream: trio.SocketStream,
        method: str,
        path: str,
        fields: list[tuple[str, str]],
        body: bytes,
    ) -> Answer:
        conn = self._h11
        data = conn.send(h11.Request(method=method, target=path, headers=fields)) or b""
        if body:
            data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise HttpError(f"sending failed: {exc}") from None
        status = 0
        chunks: list[bytes] = []
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise HttpError(f"bad response: {exc}") from None
            if event is h11.NEED_DATA:
                try:
                    received = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise HttpError(f"receiving failed: {exc}") from None
                conn.receive_data(bytes(received))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise HttpError("the server closed the connection before answering")
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            await self.aclose()
        return Answer(status, b"".join(chunks))

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.aclose()


class ValrunClient:
    """Host names for the web and the API, over one HttpConnection."""

    def __init__(
        self, target: Target, api_host: str, web_domain: str, token: str | None = None
    ) -> None:
        self.connection = HttpConnection(target)
        self.port = target.port
        self.api_host = f"{api_host}:{target.port}"
        self.web_domain = web_domain
        self.token = token

    def web_host(self, user: str, val: str) -> str:
        return f"{user}-{val.lower()}.{self.web_domain}:{self.port}"

    async def call(self, user: str, val: str, path: str = "/") -> Answer:
        return await self.connection.request("GET", path, self.web_host(user, val))

    async def api(self, method: str, path: str, payload: object = None) -> Answer:
        headers = [("authorization", f"Bearer {self.token}")] if self.token else []
        body = b""
        if payload is not None:
            body = json.dumps(payload).encode()
            headers.append(("content-type", "application/json"))
        return await self.connection.request(method, path, self.api_host, headers, body)

    async def put_val(self, user: str, val: str, code: str) -> None:
        answer = await self.api("PUT", f"/v1/vals/{user}/{val}", {"code": code})
        if answer.status not in (200, 201):
            raise HttpError(f"saving {user}/{val} answered {answer.status}: {answer.body[:300]!r}")

    async def whoami(self) -> str:
        answer = await self.api("GET", "/v1/me")
        if answer.status != 200:
            raise HttpError(f"GET /v1/me answered {answer.status}: {answer.body[:300]!r}")
        name = json.loads(answer.body).get("username")
        if not isinstance(name, str):
            raise HttpError(f"GET /v1/me answered without a username: {answer.body[:300]!r}")
        return name

    async def aclose(self) -> None:
        await self.connection.aclose()


class SetupError(Exception):
    """valrun could not be set up for a measurement (its CLI said why)."""


async def create_user(config: Path, name: str) -> str:
    """`valrun user create NAME` with this config, as the benches' setup; the user's token."""
    valrun = Path(sys.executable).with_name("valrun")
    created = await trio.run_process(
        [str(valrun), "--config", str(config), "user", "create", name],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    if created.returncode != 0:
        raise SetupError(f"valrun user create failed: {created.stderr!r}")
    return created.stdout.decode().strip().splitlines()[-1]
