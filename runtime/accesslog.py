"""The access log's line: one per request, with nothing a client can use to forge lines.

A request's path is percent-decoded (`%0a` is a newline) and its Host header is the
client's text: written raw, either could end the line and start a fake one. Every control
character, C0 and C1, the Unicode line and paragraph separators and the bidirectional
overrides (which a terminal or viewer would act on), and the backslash (so an escape cannot be
forged either) are written as `\\xNN` or `\\uNNNN`.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TextIO

import trio

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\\\\\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    # Every character _UNSAFE names but the backslash is one str.isprintable refuses (Cc, Cf,
    # Zl, Zp): a line with neither is returned as it is, without a regex pass.
    if text.isprintable() and "\\" not in text:
        return text
    return _UNSAFE.sub(_escaped, text)


def access_line(
    client: str, method: str, host: str | None, path: str, status: int, elapsed_s: float, size: int
) -> str:
    return (
        f"{escape(client)} {escape(method)} {escape(host or '-')} {escape(path)} "
        f"{status} {elapsed_s * 1000:.1f}ms {size}B"
    )


# --- writing the lines ---------------------------------------------------------------------------

access_logger = logging.getLogger("valrun.access")

#: A line waits at most this long in `LineBatchHandler` before it is written.
FLUSH_AFTER_S = 0.2
#: Writes of at most this many bytes to a pipe are not interleaved with other processes'
#: (POSIX PIPE_BUF): the front-end processes share their supervisor's stderr.
PIPE_BUF = 4096


def log_access(line: str) -> None:
    """Hand one access line to the `valrun.access` logger's handlers (whose level the caller
    checked): a record made directly, without the caller lookup `Logger.info` makes, which
    walks the event loop's stack for every request."""
    access_logger.handle(
        access_logger.makeRecord(access_logger.name, logging.INFO, "", 0, line, (), None)
    )


class LineBatchHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes its lines in batches, not with a write per line: a line is
    written once `max_lines` wait, or by `flush_due`, which the server calls ten times a
    second (`flush_access_lines`), once the oldest has waited `FLUSH_AFTER_S`. Each write
    is whole lines of at most `PIPE_BUF` bytes (a longer line alone)."""

    def __init__(self, stream: TextIO, max_lines: int = 256) -> None:
        super().__init__(stream)
        self.max_lines = max_lines
        self._lines: list[str] = []
        self._first = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._lines.append(line)
        if len(self._lines) == 1:
            self._first = time.monotonic()
        elif len(self._lines) >= self.max_lines:
            self.flush()

    def flush_due(self) -> None:
        if self._lines and time.monotonic() - self._first >= FLUSH_AFTER_S:
            self.flush()

    def flush(self) -> None:
        self.acquire()
        try:
            lines, self._lines = self._lines, []
            chunk: list[str] = []
            size = 0
            for line in lines:
                if chunk and size + len(line) > PIPE_BUF:
                    self.stream.write("".join(chunk))
                    chunk, size = [], 0
                chunk.append(line)
                size += len(line)
            if chunk:
                self.stream.write("".join(chunk))
            super().flush()
        finally:
            self.release()


def batch_access_lines(stream: TextIO, formatter: logging.Formatter) -> None:
    """Write the access log to `stream` through a `LineBatchHandler` (the CLI's setup; other
    loggers keep their handlers, and a test's own handler still sees every line)."""
    handler = LineBatchHandler(stream)
    handler.setFormatter(formatter)
    access_logger.addHandler(handler)
    access_logger.propagate = False


async def flush_access_lines() -> None:
    """Write the lines each `LineBatchHandler` holds once they are due; runs beside the app."""
    while True:
        await trio.sleep(FLUSH_AFTER_S / 2)
        for handler in access_logger.handlers:
            if isinstance(handler, LineBatchHandler):
                handler.flush_due()
