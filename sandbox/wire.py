"""The wire protocol between the front end and a worker: the only thing the two sides share.

A frame is an 8-byte prefix, a JSON head and a raw body::

    +----------------+----------------+--------------------+-------------+
    | head length u32| body length u32| head: UTF-8 JSON   | body: bytes |
    +----------------+----------------+--------------------+-------------+

The head is always a JSON object (``{"op": ...}``); bodies travel as raw bytes so a 5 MiB
response is never base64-inflated or re-parsed. Never pickle: a worker is hostile, and
unpickling is code execution.

This module is sans-IO, as h11 is: `encode_frame` makes bytes, `FrameDecoder` turns bytes into
frames and knows nothing of sockets or pipes. Both limits are checked from the 8-byte prefix,
before the payload is buffered, so a peer that announces 4 GiB costs nothing but the prefix.

Messages (``op`` values), front end -> worker:
    load   head: name, mode, env, limits                     body: the val's source (UTF-8)
    http   head: id, method, url, path, query, headers       body: the request body
    call   head: id                                          body: the args, a JSON array,
                                                                   or empty: "do not call"
    cron   head: id                                          body: JSON {scheduled_at,
                                                                   last_run_at, schedule}
Worker -> front end:
    loaded   head: log
    checked  head: problems, a list of {line, message} (the `check` mode; then it exits)
    response head: id, status, headers, log, retire          body: the response body
    result   head: id, log, retire                           body: the value as UTF-8 JSON
                                                                   (`null` for cron)
    error    head: id (absent for a failed load), type, message, traceback, log, retire

``mode`` is ``"module"`` (a val: run the module once, its export is the top-level name equal
to ``name``) or ``"eval"`` (the Eval API: compile statements and a final expression; each
``call`` runs them in a fresh namespace and the expression's value is the export). On
``call``, a callable export is called with the args and its return value is the result; a
non-callable export is the result itself; with an empty body the export is the result even
when callable (Eval without args). The args travel in the body, not the head: they may be
as large as a request body (2 MiB by default), over the head limit below. ``"check"``
(checks at save) compiles the code and checks its imports and export without running any
of it, answers ``checked`` and exits.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import BinaryIO

PREFIX = struct.Struct(">II")

#: Heads carry headers (at most 64 KiB of them by default), a log (64 KiB) and the env.
DEFAULT_MAX_HEAD_BYTES = 1024 * 1024
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


class ProtocolError(Exception):
    """The peer sent something that is not a well-formed frame."""


class FrameTooLargeError(ProtocolError):
    """The peer announced a head or body over the limit."""

    def __init__(self, part: str, size: int, limit: int) -> None:
        super().__init__(f"frame {part} of {size} bytes is over the {limit}-byte limit")
        self.part = part
        self.size = size
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Frame:
    head: dict[str, object]
    body: bytes = field(default=b"", repr=False)

    @property
    def op(self) -> object:
        return self.head.get("op")


def encode_frame(frame: Frame) -> bytes:
    # A lone surrogate ("\ud800", which a val can put in any string it hands back) cannot be
    # UTF-8. It can only occur inside a JSON string, so backslashreplace writes it as exactly
    # the JSON escape `\ud800`: the head stays valid UTF-8 JSON, and never fails to encode.
    text = json.dumps(frame.head, separators=(",", ":"), ensure_ascii=False)
    head = text.encode("utf-8", errors="backslashreplace")
    return PREFIX.pack(len(head), len(frame.body)) + head + frame.body


def decode_head(raw: bytes) -> dict[str, object]:
    try:
        # Decode first: json.loads(bytes) would also guess UTF-16 and UTF-32.
        head = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"frame head is not valid JSON: {exc}") from None
    except RecursionError:  # `[[[[...]]]]` is valid JSON and fits in the size limit
        raise ProtocolError("frame head is nested too deeply") from None
    if not isinstance(head, dict):
        raise ProtocolError(f"frame head is a JSON {type(head).__name__}, not an object")
    return head


class FrameDecoder:
    """Incremental decoder: `feed` bytes as they arrive, take frames with `next_frame`."""

    def __init__(
        self,
        max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.max_head_bytes = max_head_bytes
        self.max_body_bytes = max_body_bytes
        self._buffer = bytearray()

    @property
    def pending_bytes(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_frame(self) -> Frame | None:
        """The next whole frame, or None until more bytes arrive. Raises ProtocolError."""
        if len(self._buffer) < PREFIX.size:
            return None
        head_len, body_len = PREFIX.unpack_from(self._buffer)
        if head_len > self.max_head_bytes:
            raise FrameTooLargeError("head", head_len, self.max_head_bytes)
        if body_len > self.max_body_bytes:
            raise FrameTooLargeError("body", body_len, self.max_body_bytes)
        end = PREFIX.size + head_len + body_len
        if len(self._buffer) < end:
            return None
        # Through a view: slicing the bytearray itself would copy each part twice (a
        # bytearray slice, then bytes of it), and a body may be megabytes.
        with memoryview(self._buffer) as view:
            head = decode_head(bytes(view[PREFIX.size : PREFIX.size + head_len]))
            body = bytes(view[PREFIX.size + head_len : end])
        del self._buffer[:end]
        return Frame(head, body)


# Blocking helpers for the worker side, which is synchronous and serves one frame at a time.


def read_frame(stream: BinaryIO, decoder: FrameDecoder) -> Frame | None:
    """Read one frame; None on a clean end of stream between frames."""
    while (frame := decoder.next_frame()) is None:
        chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
        if not chunk:
            if decoder.pending_bytes:
                raise ProtocolError("stream ended in the middle of a frame")
            return None
        decoder.feed(chunk)
    return frame


def write_frame(stream: BinaryIO, frame: Frame) -> None:
    stream.write(encode_frame(frame))
    stream.flush()
