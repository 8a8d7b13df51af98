"""A worker ends when the front end does, even in the middle of a val.

The front end holds the other end of the worker's socket. While the worker waits for a
request, the front end's end-of-file (its exit, crash or `send_eof`) ends the read loop. But
while a val runs (`sleep(40)`, a loop), nothing reads the socket. So the socket is put in
async mode (O_ASYNC, fcntl(2)): the kernel sends this process SIGIO when the socket becomes
readable or its peer hangs up. While a val runs, SIGIO keeps its default action (terminate)
and the front end sends nothing but, at most, its EOF; while the worker waits for a frame,
SIGIO is ignored, so the arrival of the next request costs nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal


class Tether:
    """A worker's socket whose hang-up ends the worker: `with tether:` while a val runs."""

    def __init__(self, fd: int) -> None:
        signal.signal(signal.SIGIO, signal.SIG_IGN)
        fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def __enter__(self) -> None:
        signal.signal(signal.SIGIO, signal.SIG_DFL)
        # A hang-up that came while SIGIO was still ignored sent nothing: look once.
        if self._poll.poll(0):
            os._exit(0)

    def __exit__(self, *exc_info: object) -> None:
        signal.signal(signal.SIGIO, signal.SIG_IGN)


#: For a worker without a tether (one spawned directly, in tests): nothing to arm.
UNTETHERED = contextlib.nullcontext()
