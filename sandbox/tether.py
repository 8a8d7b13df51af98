"""A worker ends when the front end does, even in the middle of a val.

The front end holds the other end of the worker's socket. While the worker waits for a
request, the front end's end-of-file (its exit, crash or `send_eof`) ends the read loop. But
while a val runs (`sleep(40)`, a loop), nothing reads the socket. So the socket is put in
async mode (O_ASYNC, fcntl(2)): the kernel sends this process SIGIO when the socket becomes
readable or its peer hangs up. The handler exits at once when the peer has hung up
(POLLRDHUP, poll(2): the front end shut down its writing side, or closed the socket), and
otherwise returns: the socket may be readable because the front end sent the next requests
ahead (pipelining), or the signal came because room freed up in the send buffer after a large
reply; the val goes on. (A `sleep` is interrupted by the signal; a long computation in C sees
it when it returns, within the CPU limit.) While the worker waits for a frame, SIGIO is
ignored, so the arrival of the next request costs nothing; so it is while a val waits for the
answer to an ask (`paused`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
from collections.abc import Iterator

HUNG_UP = select.POLLRDHUP | select.POLLHUP | select.POLLERR


class Tether:
    """A worker's socket whose hang-up ends the worker: `with tether:` while a val runs."""

    def __init__(self, fd: int) -> None:
        signal.signal(signal.SIGIO, signal.SIG_IGN)
        fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
        self._fd = fd

    def __enter__(self) -> None:
        signal.signal(signal.SIGIO, self._on_io)
        # A hang-up that came while SIGIO was still ignored sent nothing: look once.
        self._on_io(signal.SIGIO, None)

    def __exit__(self, *exc_info: object) -> None:
        signal.signal(signal.SIGIO, signal.SIG_IGN)

    def _on_io(self, signum: int, frame: object) -> None:
        # A poll object of its own each time: the signal can come while `__enter__`'s call
        # of this very handler polls, and one object refuses to poll twice at once.
        poller = select.poll()
        poller.register(self._fd, select.POLLRDHUP)
        for _fd, events in poller.poll(0):
            if events & HUNG_UP:  # the front end is gone: nothing will read our reply
                os._exit(0)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """While a val waits for the answer to an ask, which makes the socket readable."""
        armed = signal.getsignal(signal.SIGIO) == self._on_io
        signal.signal(signal.SIGIO, signal.SIG_IGN)
        try:
            yield
        finally:
            if armed:
                self.__enter__()


class Untethered:
    """For a worker without a tether (one spawned directly, in tests): nothing to arm."""

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc_info: object) -> None:
        pass

    def paused(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()


UNTETHERED = Untethered()
