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
import sys
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

#: The CLI's log lines; `{tag}` is a front-end process's index, or nothing.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s{tag}: %(message)s"
#: A line waits at most this long in `LineBatchHandler` before it is written.
FLUSH_AFTER_S = 0.2
#: Writes of at most this many bytes to a pipe are not interleaved with other processes'
#: (POSIX PIPE_BUF): the front-end processes share their supervisor's stderr.
PIPE_BUF = 4096


def log_access(line: str) -> None:
    """Hand one access line to the `valrun.access` logger (whose level the caller checked).

    As the CLI sets it up, its one handler is a `LineBatchHandler` and nothing filters: the
    line goes to it directly, without a `LogRecord` and its formatting. Otherwise (a test's
    handler, an operator's logging setup) a record is made, without the caller lookup
    `Logger.info` makes, which walks the event loop's stack for every request."""
    handlers = access_logger.handlers
    if (
        len(handlers) == 1
        and type(handler := handlers[0]) is LineBatchHandler
        and not access_logger.propagate
        and not access_logger.filters
        and not handler.filters
    ):
        handler.add(line, time.time())
        return
    access_logger.handle(
        access_logger.makeRecord(access_logger.name, logging.INFO, "", 0, line, (), None)
    )


class LineBatchHandler(logging.Handler):
    """Writes access lines to a stream in batches, not with a write per line, formatted as
    the CLI's log lines are (`2026-11-30 18:02:18,952 INFO valrun.access: ...`, with `tag`
    after the logger's name). A line is written once `max_lines` wait, or by `flush_due`,
    which the server calls ten times a second (`flush_access_lines`), once the oldest has
    waited `FLUSH_AFTER_S`. Each write is whole lines of at most `PIPE_BUF` bytes (a longer
    line alone)."""

    def __init__(self, stream: TextIO, tag: str = "", max_lines: int = 256) -> None:
        super().__init__()
        self.stream = stream
        self.max_lines = max_lines
        self._prefix = f" INFO {access_logger.name}{tag}: "
        self._lines: list[str] = []
        self._first = 0.0
        self._second = -1
        self._stamp = ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.add(record.getMessage(), record.created)
        except Exception:
            self.handleError(record)

    def add(self, message: str, created: float) -> None:
        """Queue one line, logged at `created` (Unix time)."""
        second = int(created)
        if second != self._second:  # the date and time change once a second
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        millis = int((created - second) * 1000)
        self._lines.append(f"{self._stamp},{millis:03d}{self._prefix}{message}\n")
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
                length = len(line) if line.isascii() else len(line.encode())
                if chunk and size + length > PIPE_BUF:
                    self.stream.write("".join(chunk))
                    chunk, size = [], 0
                chunk.append(line)
                size += length
            if chunk:
                self.stream.write("".join(chunk))
            self.stream.flush()
        finally:
            self.release()


def configure_logging(tag: str = "") -> None:
    """The CLI's logging: every line to stderr as `DATE TIME,MS LEVEL LOGGER{tag}: MESSAGE`
    (`tag`: a front-end process's index), the access log through a `LineBatchHandler`,
    which writes that same format itself."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT.format(tag=tag))
    access_logger.addHandler(LineBatchHandler(sys.stderr, tag))
    access_logger.propagate = False


async def flush_access_lines() -> None:
    """Write the lines each `LineBatchHandler` holds once they are due; runs beside the app."""
    while True:
        await trio.sleep(FLUSH_AFTER_S / 2)
        for handler in access_logger.handlers:
            if isinstance(handler, LineBatchHandler):
                handler.flush_due()
