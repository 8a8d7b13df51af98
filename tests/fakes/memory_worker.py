"""An in-memory worker for tests of the pool's own logic: no process, a trio stream pair.

It answers `load` with `loaded` and every request with a 200 `ok` after `delay_s`, so
hundreds of them cost nothing and a test measures the pool, not forks.
"""

from __future__ import annotations

import itertools

import trio
import trio.testing

from runtime.process import WorkerProcess
from sandbox.wire import Frame, FrameDecoder, encode_frame

_pids = itertools.count(10_000_000)


class MemoryWorker(WorkerProcess):
    def __init__(self, nursery: trio.Nursery, delay_s: float) -> None:
        ours, theirs = trio.testing.memory_stream_pair()
        super().__init__(next(_pids), ours, max_body_bytes=1 << 20)
        self.delay_s = delay_s
        #: What `rss_bytes` says: set it to stand for a worker of that size.
        self.rss: int | None = None
        self._cancel = trio.CancelScope()
        nursery.start_soon(self._serve, theirs)

    def rss_bytes(self) -> int | None:
        return self.rss

    def kill(self) -> None:
        self._cancel.cancel()

    async def _serve(
        self,
        stream: trio.StapledStream[trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream],
    ) -> None:
        decoder = FrameDecoder()
        with self._cancel:
            while True:
                frame = decoder.next_frame()
                if frame is None:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    decoder.feed(bytes(chunk))
                    continue
                if frame.op == "load":
                    reply = Frame({"op": "loaded", "log": ""})
                else:
                    await trio.sleep(self.delay_s)
                    head = {"op": "response", "id": frame.head["id"], "status": 200}
                    reply = Frame({**head, "headers": [], "log": ""}, b"ok")
                await stream.send_all(encode_frame(reply))
        self.exited(0 if not self._cancel.cancel_called else -9)
