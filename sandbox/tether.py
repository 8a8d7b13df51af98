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

import fcntl
import os
import select
import signal
from collections.abc import Iterator
from contextlib import contextmanager


def tether(fd: int) -> None:
    """Arrange for SIGIO on `fd`'s activity; ignored until `ends_at_eof` is entered."""
    signal.signal(signal.SIGIO, signal.SIG_IGN)
    fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)


@contextmanager
def ends_at_eof(fd: int | None) -> Iterator[None]:
    """While inside, the peer's hang-up (or any data) on a tethered `fd` ends this process."""
    if fd is None:
        yield
        return
    signal.signal(signal.SIGIO, signal.SIG_DFL)
    # A hang-up that came while SIGIO was still ignored sent nothing: look once.
    if select.select([fd], [], [], 0)[0]:
        os._exit(0)
    try:
        yield
    finally:
        signal.signal(signal.SIGIO, signal.SIG_IGN)
